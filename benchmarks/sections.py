"""The sections of a long benchmark run: each timed, the figures written as each one ends, and a
section that runs past its limit stopped with every thread's stack printed.

    sections = Sections(results, out / "results.json", limit_seconds=900)
    with sections("product"):
        results["product_local"] = ...

A hang (a deadlock in a library, a server that stopped answering) then ends `make bench` with
the stacks that show where, the servers it started killed, and the sections already done kept
in results.json (marked `"complete": false`), instead of a run that never returns.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

STOPPED_EXIT_STATUS = 3


class Sections:
    def __init__(self, results: dict[str, Any], path: Path, limit_seconds: float):
        self.results = results
        self.path = path
        self.limit_seconds = limit_seconds
        self.results.setdefault("section_seconds", {})

    @contextmanager
    def __call__(self, name: str, limit_seconds: float | None = None) -> Iterator[None]:
        limit = limit_seconds or self.limit_seconds
        print(f"{name} ...", flush=True)
        done = threading.Event()
        watchdog = threading.Thread(target=self._stop_after, args=(name, limit, done), daemon=True,
                                    name=f"bench-watchdog-{name}")
        watchdog.start()
        started = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            watchdog.join()
        seconds = time.perf_counter() - started
        self.results["section_seconds"][name] = round(seconds, 1)
        self.write(complete=False)
        print(f"  ({name}: {seconds:.0f} s)", flush=True)

    def write(self, complete: bool, stopped_in: str | None = None) -> None:
        """results.json as it stands; `complete` once every section has run."""
        record = {**self.results, "complete": complete, **({"stopped_in": stopped_in} if stopped_in else {})}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, self.path)

    def _stop_after(self, name: str, limit: float, done: threading.Event) -> None:
        if done.wait(limit):
            return
        print(f"\n{name}: still running after {limit:.0f} s, stopped; every thread's stack:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            self.write(complete=False, stopped_in=name)
        finally:
            _kill_children()
            os._exit(STOPPED_EXIT_STATUS)  # the hung threads cannot be joined, so no normal exit can end the run


def _kill_children() -> None:
    """The servers and workers this process started (they would outlive an `os._exit`)."""
    import psutil  # comes with distributed, which the benchmarks' Prefect runs need anyway

    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            child.kill()
