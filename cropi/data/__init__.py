"""Prompts with verifiable answers: the built-in arithmetic tasks, file
loaders for real datasets, and the verifiers that turn a response into a
reward."""

from cropi.data.types import Prompt

__all__ = ["Prompt"]
