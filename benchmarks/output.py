"""What a benchmark run alone from its command line prints and keeps."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def show_and_save(rows: Iterable[tuple[str, str, str]], result: dict[str, Any], out: Path | None) -> None:
    """Print the table rows of a benchmark's `result`, and write the result as JSON to `out` when given."""
    for row in rows:
        print("  ".join(row))
    if out:
        out.write_text(json.dumps(result, indent=1))
