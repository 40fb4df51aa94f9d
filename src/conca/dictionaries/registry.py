"""The name -> class registry of dictionary methods, and how methods are found.

A method is one module: it defines a `Dictionary` subclass and decorates it with `register`.
The first time the registry is used it imports every module of this package (except the support
modules listed in SUPPORT_MODULES), so a new module in `conca/dictionaries/` needs no other edit.

Methods outside conca are found the same way, through the environment variable CONCA_METHODS:
module names (importable from sys.path) or paths of .py files, separated by os.pathsep (':' on
Linux and macOS), e.g. ``CONCA_METHODS=/path/to/my_method.py conca train --method my_method``.
An installed package may instead declare an entry point in the group ``conca.methods`` whose
object is the module (or class) to import. Every registered method then appears in
`conca methods`, trains with `conca train --method`, sweeps, and exports where it declares a
SAELens architecture.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from conca.errors import ConfigError

if TYPE_CHECKING:
    from conca.dictionaries.base import Dictionary

ENV_VAR = "CONCA_METHODS"
ENTRY_POINT_GROUP = "conca.methods"
# Modules of this package that define no method (triton_kernels would import Triton).
SUPPORT_MODULES = frozenset({"base", "init", "kernels", "provenance", "registry", "triton_kernels"})

REGISTRY: dict[str, type["Dictionary"]] = {}
_builtin_found = False
_user_loaded: set[str] = set()


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    """Class decorator: make `cls` available under `cls.name`."""
    if not cls.name:
        raise ConfigError(f"dictionary class {cls.__qualname__} has no name: set the class attribute `name`")
    known = REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ConfigError(f"dictionary method {cls.name!r} registered twice ({known.__module__}.{known.__qualname__} "
                          f"and {cls.__module__}.{cls.__qualname__})")
    REGISTRY[cls.name] = cls
    return cls


def discover() -> None:
    """Import conca's method modules (once), installed `conca.methods` entry points (once) and any
    CONCA_METHODS entry not loaded yet (checked on every call, so a changed variable takes effect)."""
    global _builtin_found
    if not _builtin_found:
        import conca.dictionaries as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in SUPPORT_MODULES and not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            try:
                entry.load()
            except Exception as exc:  # a broken plugin is named, not a traceback
                raise ConfigError(f"cannot load conca method entry point {entry.name!r} ({entry.value}): "
                                  f"{type(exc).__name__}: {exc}") from None
        _builtin_found = True
    for spec in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if spec.strip() and spec.strip() not in _user_loaded:
            load_user_methods(spec.strip())


def load_user_methods(spec: str) -> None:
    """Import a module name or a .py file that registers methods (what CONCA_METHODS lists)."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ConfigError(f"{ENV_VAR}: no such file {spec}")
            # A private module name per file, so two files with the same stem do not collide.
            name = f"conca_user_methods.{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module  # dataclasses look their module up while the file runs
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{ENV_VAR}: cannot load {spec}: {type(exc).__name__}: {exc}") from None
    _user_loaded.add(spec)


def registered() -> list[type["Dictionary"]]:
    """Every method class, in registration order."""
    discover()
    return list(REGISTRY.values())


def methods() -> list[str]:
    """Every method name, sorted."""
    discover()
    return sorted(REGISTRY)


def get_method(name: str) -> type["Dictionary"]:
    known = methods()
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(known)}")
    return REGISTRY[name]
