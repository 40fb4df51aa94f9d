"""Interoperability with other interpretability libraries' on-disk formats."""
