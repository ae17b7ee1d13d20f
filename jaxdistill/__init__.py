"""jaxdistill: distilling image-text retrieval models into small dual encoders (JAX/Flax)."""

__version__ = "0.1.0"
