"""Pretrained teachers and student initialisations: readers of Hugging Face / published
checkpoints and the mapping of their state dicts onto the params of models/' Flax modules."""
