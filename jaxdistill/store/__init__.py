"""What a run keeps on disk and how to read it back: orbax checkpoints (checkpoint.py) and a
finished run's network + params without its recipe (run.py)."""
