"""A training run: setup, resume, the epochs, checkpoints and when they are saved, the summary."""
