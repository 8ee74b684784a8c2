"""lmjax: train, resume, evaluate and sample language models in JAX."""

__version__ = "0.1.0"
