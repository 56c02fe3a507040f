"""Rollout engines: sample responses and their log-probs from a policy."""

from cropi.rollout.base import RolloutEngine, SamplingParams, Trajectory

__all__ = ["RolloutEngine", "SamplingParams", "Trajectory"]
