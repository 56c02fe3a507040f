"""Sections of the job spec kept apart from `spec.py` (which holds the rest and `JobSpec`):
the shared strict base, `eval`, `ray` and `tracking`.

`tracking` chooses where a run's metrics go besides `metrics.jsonl`
(`cropi/tracking/`). It holds no secret: a W&B API key (WANDB_API_KEY) and
MLflow credentials (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD) come from the environment of the process that
logs, never from the spec.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cropi.spec_limits import MAX_ACTORS, MAX_BATCH, MAX_GROUP, MAX_NEW_TOKENS, MAX_STEPS


class _Section(BaseModel):
    # strict: no bool for an int (`stages: true`) or int for a bool, no "3" for 3, no 2.0 for an int;
    # an int is still taken for a float. allow_inf_nan: `.inf` and `.nan` are refused everywhere.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class EvalSpec(_Section):
    every: int = Field(20, gt=0, le=MAX_STEPS,
                       description=f"evaluate every this many training steps (at most {MAX_STEPS})")
    max_new_tokens: int | None = Field(None, gt=0, le=MAX_NEW_TOKENS,
                                       description=f"defaults to rollout.max_new_tokens (at most {MAX_NEW_TOKENS})")
    samples: int = Field(4, ge=0, le=MAX_GROUP, description="responses per prompt for sampled accuracy (0: greedy "
                                                            f"only; at most {MAX_GROUP})")
    temperature: float | None = Field(None, gt=0, description="sampling temperature; defaults to rollout.temperature")


class RaySpec(_Section):
    """Placement of the Ray executor's components (`executor: ray`)."""

    address: str | None = Field(None, description="Ray cluster to join (e.g. ray://head:10001, auto); "
                                                 "empty: RAY_ADDRESS, else a local Ray")
    num_cpus: int | None = Field(None, gt=0, le=MAX_BATCH, description="logical CPUs of a local Ray (default: "
                                                                       f"max(cores, 6); at most {MAX_BATCH})")
    projector_actors: int = Field(2, gt=0, le=MAX_ACTORS,
                                  description=f"actors of the gradient-projection pool (at most {MAX_ACTORS})")
    projector_gpus: float = Field(0, ge=0, description="GPUs per projection actor")
    rollout_app: str | None = Field(
        None, description="a standing rollout Serve app to sample on, one job at a time (e.g. the chart's "
                          "RayService app cropi-rollout); empty: CROPI_ROLLOUT_APP, else a per-job app")
    rollout_replicas: int = Field(1, gt=0, le=MAX_ACTORS, description="Ray Serve replicas of the per-job rollout "
                                                                      f"deployment (at most {MAX_ACTORS})")
    rollout_gpus: float = Field(0, ge=0, description="GPUs per replica of the per-job rollout deployment "
                                                     "(vLLM: rollout.tensor_parallel)")
    trainer_workers: int = Field(2, gt=0, le=MAX_ACTORS, description="Ray Train workers (DeepSpeed data-parallel "
                                                                     f"ranks; at most {MAX_ACTORS})")
    trainer_gpus: float = Field(0, ge=0, description="GPUs per trainer worker (0: CPU with gloo)")
    zero_stage: Literal[2, 3] = Field(3, description="DeepSpeed ZeRO stage of the trainer")
    weight_sync: Literal["broadcast", "store"] = Field(
        "broadcast", description="trainer -> rollout: torch.distributed broadcast, or a checkpoint in the store")
    sync_bucket_mb: int = Field(64, gt=0, le=MAX_BATCH,
                                description=f"bucket size of the broadcast weight sync (at most {MAX_BATCH})")


NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"  # W&B project / entity / group, MLflow experiment names
MAX_TAGS = 64


def _name(value: str | None, what: str) -> str | None:
    if value is not None and not re.fullmatch(NAME, value):
        raise ValueError(f"must be a {what}: 1-128 letters, digits, '_', '.', '-'")
    return value


class WandbSpec(_Section):
    """Weights & Biases (`backends: [wandb]`; the `tracking` extra). The API key is WANDB_API_KEY."""

    project: str | None = Field(None, description="W&B project (default: WANDB_PROJECT, else 'cropi')")
    entity: str | None = Field(None, description="W&B team or user (default: WANDB_ENTITY, else the key's user)")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online, offline (run files only, `wandb sync` later) or disabled (default: "
                          "WANDB_MODE, else online)")
    group: str | None = Field(None, description="W&B run group (e.g. one per sweep)")
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS,
                            description=f"W&B run tags (at most {MAX_TAGS}, each at most 64 characters)")
    run_name: str | None = Field(None, max_length=128, description="the run's display name (default: the job name)")

    @field_validator("project", "entity", "group")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return _name(v, "W&B name")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for i, tag in enumerate(v):
            if not tag.strip() or len(tag) > 64:
                raise ValueError(f"entry {i}: a tag has 1-64 characters")
        return v


class MlflowSpec(_Section):
    """MLflow (`backends: [mlflow]`; the `tracking` extra). Credentials: MLFLOW_TRACKING_TOKEN or
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

    tracking_uri: str | None = Field(
        None, max_length=2048, description="MLflow tracking server or store, e.g. http://mlflow:5000, "
                                           "sqlite:///mlflow.db, file:/path (default: MLFLOW_TRACKING_URI, "
                                           "else MLflow's default); no credentials in it")
    experiment: str | None = Field(None, description="experiment name (default: MLFLOW_EXPERIMENT_NAME, else "
                                                     "the job name); created when missing")
    run_name: str | None = Field(None, max_length=128, description="the run's name (default: the job name)")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str | None) -> str | None:
        return _name(v, "MLflow experiment name")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if not parts.scheme:
            raise ValueError("must be a URI with a scheme (http://, https://, sqlite:///, file:, databricks)")
        if parts.username or parts.password or "@" in parts.netloc:
            raise ValueError("must not hold credentials: set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD in the environment instead")
        return v


Backend = Literal["tensorboard", "wandb", "mlflow"]


class TrackingSpec(_Section):
    """Where metrics go as they are logged, besides `metrics.jsonl` (which every run writes)."""

    backends: list[Backend] = Field(
        default_factory=lambda: ["tensorboard"], max_length=3,
        description="tensorboard (the run folder's tb/; on a cluster's trainer: CROPI_TENSORBOARD_DIR/<job> "
                    "when set), wandb, mlflow; [] for none. wandb and mlflow need the extra: "
                    "pip install 'cropi[tracking]'")
    wandb: WandbSpec = WandbSpec()
    mlflow: MlflowSpec = MlflowSpec()

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a backend twice")
        return v

    @model_validator(mode="after")
    def _settings_of_listed_backends(self) -> TrackingSpec:
        # A `wandb:` block without `wandb` in backends would be silently ignored: a typo'd setup.
        for name in ("wandb", "mlflow"):
            settings = getattr(self, name)
            if settings != type(settings)() and name not in self.backends:
                raise ValueError(f"{name} settings are given but '{name}' is not in tracking.backends")
        return self
