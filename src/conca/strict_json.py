"""JSON that every parser reads: non-finite floats (NaN, inf), which `json.dumps` would write as
the non-standard bare words NaN/Infinity, become null."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float inside dicts, lists and tuples replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(value) for value in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """json.dumps, strict: NaN/inf written as null, and anything else non-standard refused."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
