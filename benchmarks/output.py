"""What a benchmark run alone from its command line prints and keeps."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def show_and_save(rows: Iterable[tuple[str, str, str]], result: dict[str, Any], out: Path | None) -> None:
    """Print the table rows of a benchmark's `result`, and write the result as JSON to `out` when given."""
    for row in rows:
        print("  ".join(row))
    if out:
        out.write_text(json.dumps(result, indent=1))


def json_from_child(*arguments: str) -> Any:
    """Run `python ARGUMENTS...` in a process of its own (its memory and malloc settings apart from
    this one's) and return the JSON it prints on its last line; a failure raises with its output."""
    finished = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, check=True)
    return json.loads(finished.stdout.strip().splitlines()[-1])


def first_paragraph(docstring: str | None) -> str:
    """A module docstring's first paragraph on one line: a benchmark's --help description (its
    first line alone stops mid-sentence)."""
    return " ".join((docstring or "").strip().split("\n\n")[0].split())
