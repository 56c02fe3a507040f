"""Caps of the job spec's sizes (each field's description repeats its limit)."""

# Caps of the sizes (each field's description repeats its limit): generous for any real job,
# finite so that a spec cannot make the controller generate, load or allocate without bound.
MAX_POOL = 1_000_000  # data.pool.size, influence.candidates
MAX_EVAL_SET = 100_000  # a validation or untargeted set's size, influence.max_valid_prompts
MAX_EVAL_SETS = 100  # data.validation, data.untargeted entries
MAX_GROUP = 1024  # responses per prompt: rollout.n, offline.n_pool / n_valid, eval.samples
MAX_NEW_TOKENS = 1 << 20
MAX_BATCH = 1 << 16  # sequences or prompts per batch
MAX_BATCH_TOKENS = 1 << 24  # tokens per forward/backward
MAX_PROJ_DIM = 1 << 20
MAX_STAGES = 10_000
MAX_STEPS = 10_000_000  # steps per stage, warmup steps, eval.every
MAX_ACTORS = 1024  # Ray actors, replicas, workers, draws, epochs
MAX_PARAM_PATTERNS = 1000
SEED_RANGE = {"ge": -(2**63), "le": 2**63 - 1}  # int64, as Kubernetes (the CRD) stores integers
