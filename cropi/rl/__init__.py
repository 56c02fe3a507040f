"""GRPO: loss functions, batching and the single-process trainer."""
