"""Where a job's objects live in the store: every `jobs/<job>/...` key, in one place.

    jobs/<job>/spec.yaml                                  the submitted spec
    jobs/<job>/events.jsonl                               the event log, archived when the job ends
    jobs/<job>/offline/<set>/part-<i>.parquet             offline trajectories (sampled once)
    jobs/<job>/offline/timing.json                        what sampling them cost
    jobs/<job>/stages/<s>/grads/<set>/part-<i>.npy|.json  projected gradients at stage s's start
    jobs/<job>/stages/<s>/selection.json                  the prompts stage s trains on
    jobs/<job>/stages/<s>/metrics.jsonl                   the records of stage s's steps
    jobs/<job>/stages/<s>/checkpoint/                     the policy at stage s's start (s >= 1)
    jobs/<job>/final/checkpoint/                          the policy after the last stage
    jobs/<job>/report/metrics.jsonl                       every step's records so far (rewritten at each stage end)
    jobs/<job>/report/summary.json                        the run's summary so far (rewritten at each stage end)
    jobs/<job>/report/curves.png                          its curves so far (rewritten at each stage end)
    jobs/<job>/trainer/state.pt                           the trainer's progress, weights and optimizer
    jobs/<job>/trainer/zero/slot-<0|1>/                   ZeRO-3 shards (two slots, alternating)
    jobs/<job>/trainer/weights/                           weights published to rollout replicas

The influence and rl packages take the keys they write as arguments and
never build one: only the curriculum knows what a job or a stage is.
"""

from __future__ import annotations


def job_prefix(job: str) -> str:
    """Everything of one job is under this prefix (ends with '/')."""
    return f"jobs/{job}/"


def spec_key(job: str) -> str:
    return f"jobs/{job}/spec.yaml"


def events_key(job: str) -> str:
    return f"jobs/{job}/events.jsonl"


def offline_prefix(job: str, set_name: str | None = None) -> str:
    """All of a job's offline trajectories, or one set's (ends with '/' then, for listing)."""
    return f"jobs/{job}/offline" if set_name is None else f"jobs/{job}/offline/{set_name}/"


def offline_part_key(job: str, set_name: str, index: int) -> str:
    return f"{offline_prefix(job, set_name)}part-{index:05d}.parquet"


def offline_timing_key(job: str) -> str:
    return f"jobs/{job}/offline/timing.json"


def stage_prefix(job: str, stage: int) -> str:
    return f"jobs/{job}/stages/{stage}"


def grads_key(job: str, stage: int, set_name: str, part: int) -> str:
    return f"{stage_prefix(job, stage)}/grads/{set_name}/part-{part:05d}.npy"


def selection_key(job: str, stage: int) -> str:
    return f"{stage_prefix(job, stage)}/selection.json"


def stage_metrics_key(job: str, stage: int | str) -> str:
    return f"jobs/{job}/stages/{stage}/metrics.jsonl"


def checkpoint_prefix(job: str, stage: int) -> str:
    """The policy at the start of `stage` (written by the trainer when stage - 1 ends)."""
    return f"{stage_prefix(job, stage)}/checkpoint"


def final_checkpoint_prefix(job: str) -> str:
    return f"jobs/{job}/final/checkpoint"


def trainer_state_key(job: str) -> str:
    return f"jobs/{job}/trainer/state.pt"


def zero_slot(job: str, step: int) -> str:
    """Two alternating ZeRO-3 checkpoint slots: a save that dies halfway never spoils the one the state points to."""
    return f"jobs/{job}/trainer/zero/slot-{step % 2}"


def published_weights_prefix(job: str) -> str:
    return f"jobs/{job}/trainer/weights"


def report_prefix(job: str) -> str:
    """What a cluster job reports at each stage end, for `cropi fetch` (metrics, summary, curves)."""
    return f"jobs/{job}/report"


def report_key(job: str, name: str) -> str:
    """`name`: metrics.jsonl, summary.json or curves.png."""
    return f"{report_prefix(job)}/{name}"
