"""conca: find human-interpretable concepts inside language models."""

__version__ = "0.1.0"
