"""Property: every image reader input, however hostile, is decoded or refused with ImageReadError
within 5 s and 1 GiB (issue 19, classes 1 and 9).

Several hundred inputs generated from a seed (`reader_fuzz.py`: truncations, bit flips, extreme
header values, decompression bombs, many pages, other formats named as images) are decoded one
after another in ONE subprocess limited to 1 GiB of address space; a MemoryError, any other
exception, a wrong result or a slow input fails the test, naming the input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

SEED = 19
SECONDS_PER_INPUT = 5.0


def _fuzz(seed: int) -> tuple[list[dict], dict | None, str]:
    """(finished inputs, the input started but never finished (a hang or crash), stderr)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # thread pools would reserve address space
    command = [sys.executable, "-m", "tests.reliability.reader_fuzz", "--seed", str(seed)]
    try:
        child = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        stdout, stderr = child.stdout, child.stderr + f"\n(exit status {child.returncode})"
    except subprocess.TimeoutExpired as hung:
        stdout = hung.stdout.decode() if isinstance(hung.stdout, bytes) else hung.stdout or ""
        stderr = "(killed after 300 s)"
    lines = [json.loads(line) for line in stdout.splitlines()]
    finished = [line for line in lines if "outcome" in line]
    started = [line for line in lines if "start" in line]
    unfinished = started[-1] if started and (not finished or finished[-1]["index"] != started[-1]["start"]) else None
    if not any("cases" in line for line in lines) and unfinished is None:
        unfinished = {"start": len(finished), "case": "(the fuzzer did not finish)"}
    return finished, unfinished, stderr[-3000:]


def test_every_hostile_input_is_decoded_or_refused_in_bounded_time_and_memory():
    finished, unfinished, stderr = _fuzz(SEED)
    assert unfinished is None, f"input {unfinished['start']} ({unfinished['case']}) never finished:\n{stderr}"
    assert len(finished) >= 300
    bad = [f"#{row['index']} {row['case']}: {row['outcome']} in {row['seconds']} s: {row['detail']}"
           for row in finished if row["outcome"] not in ("decoded", "refused") or row["seconds"] > SECONDS_PER_INPUT]
    assert not bad, "\n".join(bad)

    wrong = [f"#{row['index']} {row['case']}: expected a refusal saying {row['expected']!r}, got {row['detail']}"
             for row in finished if row["expected"] and (row["outcome"] != "refused" or row["expected"] not in row["detail"])]
    assert not wrong, "\n".join(wrong)
    unmutated = [row for row in finished if row["case"].endswith(", as written")]
    assert unmutated and all(row["outcome"] == "decoded" for row in unmutated), unmutated
    outcomes = [row["outcome"] for row in finished]
    assert outcomes.count("decoded") >= 50 and outcomes.count("refused") >= 100  # the mutations reach the decoders
