"""Pretrained teachers and student initialisations: Flax modules for Hugging Face / published
checkpoint layouts and the mapping of those checkpoints onto Flax params (issue 3)."""
