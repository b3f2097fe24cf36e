"""Checkpoint conversions: LoRA/embedding formats, single-file checkpoints, merging."""
