"""Running the `cellseg` command for the reliability tests: several at once, in a folder, or with
a file-size limit standing in for a full disk (tests run as root, where chmod blocks nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

CELLSEG = str(Path(sys.executable).parent / "cellseg")

# Exec the command with RLIMIT_FSIZE set and SIGXFSZ ignored (both survive exec), so a write past
# the limit fails with EFBIG instead of killing the process: a disk that fills up mid-run.
_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def clean_environment() -> dict[str, str]:
    """This environment without the developer's CELLSEG_* settings (as tests.conftest.cellseg)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}


def cellseg_run(*args: str, cwd: Path | None = None, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """`cellseg ARGS` as a user runs it, in `cwd`, with no file written past `max_file_bytes` when given."""
    command = [CELLSEG, *args]
    if max_file_bytes is not None:
        command = [sys.executable, "-c", _LIMITED, str(max_file_bytes), *command]
    return subprocess.run(command, capture_output=True, text=True, env=clean_environment(), cwd=cwd, timeout=600,
                          check=False)


def at_once(*runs: Callable[[], subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    """Start every run at once (each command spends seconds importing); their results in order."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: run(), runs))


def together(*commands: Sequence[str], **options: Any) -> list[subprocess.CompletedProcess]:
    """`cellseg_run(*command, **options)` of each command at once; results in order."""
    return at_once(*(partial(cellseg_run, *command, **options) for command in commands))


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str, prefix: str = "") -> str:
    """Exit status 2 and one line on stderr, starting with `prefix` and naming each of `named`,
    without a traceback; returns the line."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def file_contents(root: Path) -> dict[str, bytes]:
    """Every file under the folder `root` (or the file `root`) with its contents."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}
