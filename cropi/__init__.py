"""cropi: influence-guided curriculum RL (CROPI) for language models."""

__version__ = "0.1.0"
