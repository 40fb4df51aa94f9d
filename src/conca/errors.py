"""One small hierarchy so that callers (and the CLI) can tell bad input from bugs."""

from __future__ import annotations


class ConcaError(Exception):
    """Base class: anything the user can fix by changing their input or config."""


class ConfigError(ConcaError):
    """An option has a bad or unknown value."""


class InputError(ConcaError):
    """A file, model, text or activation source is missing, empty or malformed."""


class ShapeError(InputError):
    """Activations or weights have the wrong width."""


class CorruptDataError(InputError):
    """A stored file fails its checksum or holds non-finite values."""
