"""Hugging Face hub access: offline unless the user allowed downloads.

`local_files_only=True` alone is not enough: huggingface_hub still reaches the hub while building
its user agent, and `datasets.load_dataset` has no such argument. Inside `hub_access(False)` the
libraries' own offline switches are on (the environment variables, read when they are first
imported, and the module constants they were read into, for libraries already imported), so no
request leaves the process; on exit everything is put back as it was. With `allow_download` the
user's own settings are left alone (an HF_HUB_OFFLINE=1 of theirs still holds)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# (module, attribute) holding a copy of the offline switch taken at import time.
_OFFLINE_CONSTANTS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("transformers.utils.hub", "_is_offline_mode"),  # transformers 4.x keeps its own copy
)

OFFLINE_HINT = "conca does not download at run time unless you pass --allow-download"


@contextlib.contextmanager
def hub_access(allow_download: bool) -> Iterator[None]:
    """Within: the Hugging Face libraries make no network request unless `allow_download`."""
    if allow_download:
        yield
        return
    # Imported first, so that it reads the user's environment rather than ours and can be put back.
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants  # noqa: F401
    saved_env = {name: os.environ.get(name) for name in OFFLINE_ENV}
    saved_constants = []
    try:
        for name in OFFLINE_ENV:
            os.environ[name] = "1"
        for module_name, attribute in _OFFLINE_CONSTANTS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attribute):
                saved_constants.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, True)
        yield
    finally:
        for module, attribute, value in reversed(saved_constants):
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
