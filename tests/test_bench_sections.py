"""`make bench`'s sections: timed, written as they end, and a hung one stopped with the stacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from benchmarks.sections import STOPPED_EXIT_STATUS, Sections


def test_each_section_is_timed_and_written_as_it_ends(tmp_path):
    results: dict = {}
    sections = Sections(results, tmp_path / "results.json", limit_seconds=60)
    with sections("first"):
        results["first"] = {"value": 1}
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["first"] == {"value": 1} and written["complete"] is False
    assert set(written["section_seconds"]) == {"first"}
    sections.write(complete=True)
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_a_hung_section_is_stopped_with_its_stacks_its_servers_killed_and_the_done_sections_kept(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys, threading, time
        from pathlib import Path
        from benchmarks.sections import Sections
        results = {{}}
        sections = Sections(results, Path({str(tmp_path / "results.json")!r}), limit_seconds=60)
        with sections("quick"):
            results["quick"] = 1
        server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path({str(tmp_path / "server.pid")!r}).write_text(str(server.pid))
        def deadlock():
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()
        with sections("hangs", limit_seconds=2):
            deadlock()
        """)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == STOPPED_EXIT_STATUS, run.stderr
    assert time.monotonic() - started < 30
    assert "hangs: still running after 2 s" in run.stderr and "in deadlock" in run.stderr  # where it hung
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["quick"] == 1 and written["stopped_in"] == "hangs" and written["complete"] is False
    pid = int((tmp_path / "server.pid").read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
