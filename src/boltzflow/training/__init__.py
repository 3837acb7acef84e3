"""Training: Trainer, checkpoints (atomic, resumable), reporters, run directories."""
