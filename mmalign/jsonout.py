"""Strict JSON for every file mmalign writes: NaN and infinities become ``null``, never ``NaN``."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def strict(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` (recursively through dicts, lists, tuples)."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dump(obj: Any, path: str, indent: int = 1) -> str:
    """Write ``obj`` as strict JSON at ``path`` (its folder created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=indent, allow_nan=False)
    return path
