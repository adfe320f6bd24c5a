"""vistrain: a callback-driven PyTorch training engine for vision models."""

__version__ = "0.1.0"
