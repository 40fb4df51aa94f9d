"""Dictionary methods; importing this package registers them all."""

from conca.dictionaries import align, conca, relu, sae, structured, topk_family  # noqa: F401
from conca.dictionaries.base import REGISTRY, Dictionary, create, get_method, load_dictionary, methods

__all__ = ["REGISTRY", "Dictionary", "create", "get_method", "load_dictionary", "methods"]
