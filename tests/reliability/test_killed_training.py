"""`cellseg train` killed (SIGKILL) in the middle of an epoch, then run again with --resume:
it continues from the last checkpoint and ends exactly where an uninterrupted run ends (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

# Epochs of about a second each on 2 cores; the run is killed 0.3 s into the third. Eight leave it
# some 5 s of training to do then, not the 1.7 s that 4 left: a test process starved that long on a
# loaded machine would find the run ended ("training finished before it could be killed").
EPOCHS = 8


def train_command(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cellseg"), "train", "--images", str(dataset / "images"),
            "--masks", str(dataset / "masks"), "--out", str(out), "--epochs", str(EPOCHS), "--depth", "2",
            "--base-width", "8", "--patch-size", "96", "--patches-per-image", "6", "--patience", "100", *extra]


def epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def test_training_killed_mid_epoch_resumes_to_the_uninterrupted_result(synthetic_dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in both runs
    subprocess.run(train_command(synthetic_dataset, tmp_path / "full"), env=env, check=True, capture_output=True)

    cut = tmp_path / "cut"
    process = subprocess.Popen(train_command(synthetic_dataset, cut), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while epochs_done(cut) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the third epoch
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = epochs_done(cut)
    assert 2 <= killed_at < EPOCHS

    resumed = subprocess.run(train_command(synthetic_dataset, cut, "--resume"), env=env, capture_output=True, text=True,
                             check=False)
    assert resumed.returncode == 0, resumed.stderr

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_crops_per_second")} for r in history]

    full_history = json.loads((tmp_path / "full" / "history.json").read_text())
    assert strip(json.loads((cut / "history.json").read_text())) == strip(full_history)
    full = load_checkpoint(str(tmp_path / "full" / "last.pt")).state_dict
    again = load_checkpoint(str(cut / "last.pt")).state_dict
    for name, tensor in full.items():
        assert torch.equal(tensor, again[name]), name
