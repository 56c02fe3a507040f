"""Model loading and the built-in tiny model."""
