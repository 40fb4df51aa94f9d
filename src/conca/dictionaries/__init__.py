"""Dictionary methods. The registry finds them (every method module of this package, and user
methods named in CONCA_METHODS or a `conca.methods` entry point) the first time it is used."""

from conca.dictionaries.base import (REGISTRY, Dictionary, DictionaryConfig, SparsityGrid, create, get_method,
                                     load_dictionary, methods, register, registered)

__all__ = ["REGISTRY", "Dictionary", "DictionaryConfig", "SparsityGrid", "create", "get_method", "load_dictionary",
           "methods", "register", "registered"]
