"""The job spec: one typed model shared by `cropi run`, `cropi submit`, the
controller API and the CurriculumJob CRD (docs/design.md §3).

Every section forbids unknown keys, so a typo is an error naming its field
path rather than a silently ignored setting. Values are strict: an integer
field takes no boolean, float or string, a boolean field no number, and no
number may be infinite or NaN. Sizes that drive generation, loading or
allocation have finite caps (each field's description gives its limit), so a
spec cannot make the controller or a worker work without bound.

Spec YAML is read by `_SpecLoader`: duplicate keys, anchors and aliases are
refused (naming the line), and `1e-4` is a float as in YAML 1.2. Error
messages name the source, the field path and the line, never the value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cropi.errors import InputError
from cropi.spec_sections import EvalSpec, RaySpec, TrackingSpec, _Section
from cropi.spec_limits import (MAX_ACTORS, MAX_BATCH, MAX_BATCH_TOKENS, MAX_EVAL_SET, MAX_EVAL_SETS, MAX_GROUP,
                                MAX_NEW_TOKENS, MAX_PARAM_PATTERNS, MAX_POOL, MAX_PROJ_DIM, MAX_STAGES, MAX_STEPS,
                                SEED_RANGE)
from cropi.spec_yaml import SpecDumper, format_validation_error, load_yaml, read_spec_text
from cropi.userfn import check_function_ref, is_function_ref


def _require(pattern: str, value: str, message: str) -> str:
    if not re.fullmatch(pattern, value):
        raise ValueError(message)
    return value


class ModelSpec(_Section):
    path: str = Field("builtin:tiny-arith", description="builtin:tiny-arith, a local HF folder or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on the CPU")


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"  # `device:` (resolved by cropi/devices.py)
BUILTIN_VERIFIERS = ("auto", "int", "math")
REWARD_ARITY = 3  # a user reward function is called as fn(response, reference, row)


def _check_verifier(value: str) -> str:
    if value in BUILTIN_VERIFIERS:
        return value
    if not is_function_ref(value):
        raise ValueError(f"must be one of {', '.join(BUILTIN_VERIFIERS)}, module:function or path/to/file.py:function")
    check_function_ref(value)  # found now (never run: parsing runs no user code), so a typo fails at submit
    return value


class DataSource(_Section):
    source: str = Field(description="builtin:arith?..., or a .jsonl/.parquet file or a saved HF dataset folder")
    size: int | None = Field(None, gt=0, description=f"take at most this many prompts (seeded choice; at most "
                                                     f"{MAX_POOL})")
    prompt_field: str = Field("prompt", description="dotted path of the prompt (a string, or a chat: a list of "
                                                    "{role, content} messages as in verl parquet)")
    answer_field: str = Field("answer", description="dotted path of the reference answer, e.g. "
                                                    "reward_model.ground_truth")
    id_field: str | None = Field(None, description="dotted path of a stable prompt id (default: the row index)")
    data_source_field: str = Field("data_source", description="dotted path of the row's data source "
                                                              "(what verifier_by_source dispatches on)")
    verifier: str = Field(
        "auto", description="auto (builtin sources: int, files: math), int, math (math-verify), or a function "
                            "module:function or path/to/file.py:function called as fn(response, reference, row)"
    )
    verifier_by_source: dict[str, str] = Field(
        default_factory=dict, description="data_source value -> verifier, per row as verl dispatches its reward "
                                          "(key 'default' for the others); overrides verifier where it matches"
    )
    template: str = Field("{prompt}", description="'chat' (the tokenizer's chat template), or a format string "
                                                  "with {prompt}; write literal braces doubled: \\boxed{{}}")
    system_prompt: str | None = Field(None, description="with template: chat, a system message before the prompt")

    @field_validator("size")
    @classmethod
    def _pool_cap(cls, v: int | None) -> int | None:
        # A validator rather than `le`, which keeps this field's CRD schema as it was; sets have `le`.
        if v is not None and v > MAX_POOL:
            raise ValueError(f"must be at most {MAX_POOL}")
        return v

    @field_validator("verifier")
    @classmethod
    def _known_verifier(cls, v: str) -> str:
        return _check_verifier(v)

    @field_validator("verifier_by_source")
    @classmethod
    def _known_verifiers(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            try:
                _check_verifier(value)
            except ValueError as err:
                raise ValueError(f"[{key!r}]: {err}") from None
        return v

    @field_validator("prompt_field", "answer_field", "id_field", "data_source_field")
    @classmethod
    def _dotted_path(cls, v: str | None) -> str | None:
        if v is not None and not all(v.split(".")):
            raise ValueError("must be a field name or a dotted path such as reward_model.ground_truth")
        return v

    @field_validator("system_prompt")
    @classmethod
    def _system_needs_chat(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("template") != "chat":
            raise ValueError("only applies with template: chat")
        return v


class NamedSource(DataSource):
    size: int | None = Field(None, gt=0, le=MAX_EVAL_SET, description=f"take at most this many prompts (seeded "
                                                                       f"choice; at most {MAX_EVAL_SET})")
    name: str

    @field_validator("name")
    @classmethod
    def _simple_name(cls, v: str) -> str:
        # Set names become storage keys.
        return _require(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v, "must be 1-63 letters, digits, '_', '.', '-'")


class DataSpec(_Section):
    pool: DataSource = DataSource(source="builtin:arith", size=4000)
    validation: list[NamedSource] = Field(default_factory=list, max_length=MAX_EVAL_SETS,
                                          description=f"targeted evaluation sets (at most {MAX_EVAL_SETS})")
    untargeted: list[NamedSource] = Field(default_factory=list, max_length=MAX_EVAL_SETS,
                                          description=f"untargeted evaluation sets (at most {MAX_EVAL_SETS})")


class RolloutSpec(_Section):
    n: int = Field(8, ge=2, le=MAX_GROUP, description=f"responses per prompt (group size; at most {MAX_GROUP})")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_NEW_TOKENS, description=(
        f"response budget (default: 16 for the built-in model, 1024 for any other; at most {MAX_NEW_TOKENS})"))
    engine: Literal["hf", "vllm"] = "hf"
    batch_size: int | None = Field(None, gt=0, le=MAX_BATCH, description=(
        f"sequences per generation batch (default: 256 for the built-in model, 32 for any other; at most {MAX_BATCH})"))
    tensor_parallel: int = Field(1, gt=0, le=MAX_ACTORS,
                                 description=f"GPUs per vLLM replica (engine: vllm; at most {MAX_ACTORS})")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM's share of its GPUs' memory")


class OfflineSpec(_Section):
    n_pool: int = Field(8, ge=2, le=MAX_GROUP,
                        description=f"offline responses per pool prompt (at most {MAX_GROUP})")
    n_valid: int = Field(32, ge=2, le=MAX_GROUP,
                         description=f"offline responses per validation prompt (at most {MAX_GROUP})")
    temperature: float = Field(0.5, gt=0)


class RLSpec(_Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float | None = Field(None, gt=0, description="default: 1e-3 for the built-in model, 1e-6 (the paper's) "
                                                     "for any other")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer: sgd)")
    batch_prompts: int = Field(16, gt=0, le=MAX_BATCH, description=f"prompts per GRPO step (at most {MAX_BATCH})")
    kl_coef: float = Field(0.001, ge=0)
    entropy_coef: float = Field(0.001, ge=0)
    clip_eps: float = Field(0.2, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, description="linear learning-rate warmup (Adam's first steps "
                                                                  f"are sign-like and noisy; at most {MAX_STEPS})")
    weight_decay: float = Field(0.0, ge=0)
    ppo_epochs: int = Field(1, gt=0, le=MAX_ACTORS,
                            description=f"optimizer passes over each rollout batch (at most {MAX_ACTORS})")
    adv_eps: float = Field(1e-4, gt=0, description="std epsilon of group-normalised advantages")
    micro_batch: int | None = Field(None, gt=0, le=MAX_BATCH, description="sequences per forward/backward (gradient "
                                    "accumulation; default: 256 for the built-in model, 4 for any other; "
                                    f"at most {MAX_BATCH})")
    micro_batch_tokens: int | None = Field(None, gt=0, le=MAX_BATCH_TOKENS, description="instead of micro_batch: "
                                           "padded tokens per forward/backward (rows = this // the batch's padded "
                                           f"width, at least 1; at most {MAX_BATCH_TOKENS})")


Selector = Literal[
    "cropi", "full", "random", "learnability", "pass_rate", "influence_once",
    "learnability_once", "pass_rate_once", "dynamic",
]


class CurriculumSpec(_Section):
    selector: Selector = "cropi"
    stages: int = Field(5, gt=0, le=MAX_STAGES, description=f"curriculum stages (at most {MAX_STAGES})")
    steps_per_stage: int = Field(40, gt=0, le=MAX_STEPS, description=f"GRPO steps per stage (at most {MAX_STEPS})")
    select_ratio: float = Field(0.1, gt=0, le=1)
    reset_optimizer: bool = False
    target_accuracy: float | None = Field(None, gt=0, le=1, description="stop early once the mean targeted accuracy reaches this")
    dynamic_max_draws: int = Field(
        4, gt=0, le=MAX_ACTORS, description="selector dynamic: at most this many prompt batches sampled per step to "
                                            "fill the batch with groups of mixed rewards (verl's "
                                            f"max_num_gen_batches; at most {MAX_ACTORS})")


class InfluenceSpec(_Section):
    proj_dim: int = Field(8192, gt=0, le=MAX_PROJ_DIM,
                          description=f"dimension of the projected gradients (at most {MAX_PROJ_DIM})")
    # Measured with `cropi bench precision` (docs/performance.md): on the tiny
    # model, precision@10% vs exact gradients is 1.00 at ratio 1.0, k=8192 and
    # 0.74 at ratio 0.1 (block subsampling drops concentrated gradient mass).
    # Re-measure on large models, where subsampling variance is smaller.
    sparse_ratio: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, **SEED_RANGE, description="seed of the random projection (a signed 64-bit integer)")
    max_valid_prompts: int = Field(100, gt=0, le=MAX_EVAL_SET, description="target prompts per validation set "
                                                                          "(eligible ones only; at most "
                                                                          f"{MAX_EVAL_SET})")
    logprob_temperature: float | None = Field(
        None, gt=0, description="temperature of the POPI log-probs: null (or 'sampling') scores responses at the "
                                "temperature they were sampled at, so rho = 1 at the base policy; 1.0 recomputes "
                                "both policies at T = 1, as the reference code does")

    batch_tokens: int | None = Field(
        2048, gt=0, le=MAX_BATCH_TOKENS,
        description="scoring pass size: the offline groups of many prompts share one forward and "
                    "backward holding at most this many tokens (prompts once per group); null: one "
                    "backward per prompt. Results equal within fp32 rounding either way "
                    f"(at most {MAX_BATCH_TOKENS})")
    candidates: int | None = Field(
        None, gt=0, le=MAX_POOL,
        description="score only a seeded random subset of this many eligible pool prompts per "
                    f"stage (a new subset each stage); null scores every pool prompt (at most {MAX_POOL})")
    params: list[str] | None = Field(
        None, min_length=1, max_length=MAX_PARAM_PATTERNS,
        description="take POPI gradients of these parameters only: glob patterns on "
                    "parameter names, or 'last:L' for the last L decoder layers, the final "
                    "norm and the output head; backward stops below the lowest one. "
                    f"null: every trainable parameter (at most {MAX_PARAM_PATTERNS} patterns)")

    @field_validator("logprob_temperature", mode="before")
    @classmethod
    def _sampling_keyword(cls, v: Any) -> Any:
        return None if v == "sampling" else v

    @field_validator("params")
    @classmethod
    def _param_patterns(cls, v: list[str] | None) -> list[str] | None:
        for i, pattern in enumerate(v or []):
            if not pattern.strip():
                raise ValueError(f"entry {i} is empty")
            if pattern.startswith("last:") and not (pattern[5:].isdigit() and int(pattern[5:]) > 0):
                raise ValueError(f"entry {i}: 'last:L' needs a positive whole number of layers")
        return v


# Sizes whose default depends on the model (`JobSpec._sized_defaults`): the 1M-parameter toy
# learns fast from short answers; an LLM needs the paper's small lr and long responses.
TOY_DEFAULTS = {("rl", "lr"): 1e-3, ("rl", "micro_batch"): 256, ("rollout", "max_new_tokens"): 16,
                ("rollout", "batch_size"): 256}
LLM_DEFAULTS = {("rl", "lr"): 1e-6, ("rl", "micro_batch"): 4, ("rollout", "max_new_tokens"): 1024,
                ("rollout", "batch_size"): 32}


class JobSpec(_Section):
    name: str = "cropi-job"
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    rollout: RolloutSpec = RolloutSpec()
    offline: OfflineSpec = OfflineSpec()
    rl: RLSpec = RLSpec()
    curriculum: CurriculumSpec = CurriculumSpec()
    influence: InfluenceSpec = InfluenceSpec()
    eval: EvalSpec = EvalSpec()
    executor: Literal["inline", "ray"] = Field(
        "inline", validate_default=True,
        description="inline: tasks run in the worker process; ray: on the Ray components of `ray`")
    ray: RaySpec = RaySpec()
    tracking: TrackingSpec = TrackingSpec()
    device: str = Field("auto", description="where the inline executor computes: auto (CUDA when present), "
                                            "cpu, cuda or cuda:N")
    seed: int = Field(0, **SEED_RANGE, description="seed of the job's random choices (a signed 64-bit integer)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        return _require(DEVICE_PATTERN, v, "must be auto, cpu, cuda or cuda:N")

    @field_validator("name")
    @classmethod
    def _dns_name(cls, v: str) -> str:
        # Job names become Kubernetes object names and storage prefixes. The controller stores a
        # tenant's job as <tenant>.<name> (services/controller/tenancy.py); a user's name has no dot.
        return _require(r"([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v,
                        "must be a DNS label: lowercase letters, digits and '-', 1-63 chars")

    @field_validator("executor")
    @classmethod
    def _engine_runs_there(cls, v: str, info: ValidationInfo) -> str:
        # Checked here, not where a job runs: the inline worker would quietly sample with HF instead.
        rollout = info.data.get("rollout")
        if v == "inline" and rollout is not None and rollout.engine != "hf":
            raise ValueError(f"rollout.engine {rollout.engine} runs in the Ray rollout service; set executor: ray "
                             "(the inline executor uses the 'hf' engine)")
        return v

    @model_validator(mode="after")
    def _sized_defaults(self) -> JobSpec:
        """Unset sizes get the defaults of the model's kind: the built-in toy or a real LLM."""
        sizes = TOY_DEFAULTS if self.model.path.startswith("builtin:") else LLM_DEFAULTS
        for (section, name), value in sizes.items():
            part = getattr(self, section)
            if getattr(part, name) is None:
                setattr(part, name, value)
        return self

    @property
    def total_steps(self) -> int:
        return self.curriculum.stages * self.curriculum.steps_per_stage

    def to_yaml(self) -> str:
        # SpecDumper never writes anchors or aliases, which _SpecLoader refuses.
        return yaml.dump(self.model_dump(mode="json"), Dumper=SpecDumper, sort_keys=False)


# --------------------------------------------------------------------------
# Loading with errors that point at the offending field and line (the YAML side: spec_yaml.py).


def parse_spec(data: Any, source: str = "spec", root: yaml.Node | None = None) -> JobSpec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"invalid job spec ({source}): the top level must be a mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise InputError(format_validation_error(err, source, root)) from None


def parse_spec_yaml(text: str, source: str = "spec") -> JobSpec:
    """A spec from YAML text (a file's content, an API payload); errors name `source` and the line."""
    data, root = load_yaml(text, source)
    return parse_spec(data, source, root)


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    return parse_spec_yaml(read_spec_text(path), str(path))
