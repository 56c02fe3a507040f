"""GRPO: the loss, batching, and the one trainer loop with its backends (torch; DeepSpeed ZeRO-3 in `zero3`)."""
