"""Values that strict JSON can hold: NaN and infinities become null.

Python's `json` writes NaN and Infinity, which strict parsers (JavaScript's, jq, most other
languages') refuse. Everything cellseg writes as JSON (store metadata, `--json` output) passes
through `finite_json` first, or is written with `dumps`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_json(value: Any) -> Any:
    """`value` (nested mappings, lists, numbers) with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy scalar
        return finite_json(value.item())
    return value


def dumps(value: Any, **options: Any) -> str:
    """`json.dumps` of `finite_json(value)`, refusing anything that is still not strict JSON."""
    return json.dumps(finite_json(value), allow_nan=False, **options)
