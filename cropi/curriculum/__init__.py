"""The curriculum: training-prompt sampling, stage loop and the embedded run."""
