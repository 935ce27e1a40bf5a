"""`cellseg tune` as a user runs it: when every trial fails, when Ctrl-C stops it, and what it prints
at the end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cellseg.registry import Registry
from tests.conftest import cellseg

TWO_POINT_GRID = ("--lr", "1e-3", "3e-3", "--base-width", "8", "--depth", "2", "--dropout", "0", "--loss", "bce",
                  "--augmentation", "flips", "--border-weight", "0")
TINY_TRAINING = '{"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}'
# A setting every trial fails on, as it trains: a GPU this machine lacks.
MISSING_GPU = "ValueError: device 'cuda:63' was requested but CUDA is not available on this machine"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="every trial must fail for want of a GPU")


def _tune(synthetic_dataset: Path, tmp_path: Path, *args: str) -> list[str]:
    return ["tune", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "labels"),
            "--registry", str(tmp_path / "registry"), "--cache-dir", str(tmp_path / "cache"),
            "--work-dir", str(tmp_path / "tuning"), *TWO_POINT_GRID, *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")}


@pytest.mark.integration
@needs_no_gpu
def test_every_trial_failing_ends_in_one_line_after_the_table_and_registers_nothing(synthetic_dataset, tmp_path):
    run = cellseg(*_tune(synthetic_dataset, tmp_path, "--trials", "2", "--parallel", "2", "--training-json",
                         TINY_TRAINING.replace('"cpu"', '"cuda:63"')), env=_env(tmp_path), check=False)
    assert run.returncode == 2, run.stderr
    error = MISSING_GPU
    assert run.stderr.strip().splitlines()[-2] == (
        f"cellseg tune: error: no trial finished, so there is no model to register (trials 1, 2: {error})")
    rows = [line for line in run.stdout.splitlines() if line.endswith(f"failed: {error}")]
    assert len(rows) == 2
    assert run.stdout.splitlines()[-1] == "2 trials ran of a 2-point search grid; 0 done, 2 failed"
    assert Registry(str(tmp_path / "registry")).versions() == []


@pytest.mark.integration
def test_one_pair_is_refused_before_any_trial_trains_and_settings_the_search_sets_are_said(synthetic_dataset, tmp_path):
    """It trained every trial, then said "no validation Dice"; a learning rate given was dropped unsaid."""
    one = tmp_path / "one"
    for kind in ("images", "labels"):
        (one / kind).mkdir(parents=True)
        first = sorted((synthetic_dataset / kind).iterdir())[0]
        shutil.copy(first, one / kind / first.name)
    run = cellseg(*_tune(one, tmp_path, "--trials", "2", "--training-json",
                         TINY_TRAINING[:-1] + ', "learning_rate": 0.5}'), env=_env(tmp_path), check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-2] == (
        "cellseg tune: error: tuning needs at least 2 image/mask pairs, one to train on and one to score the trials "
        "by (validation Dice); the dataset has 1")
    assert ("training.learning_rate given but not used: the search space sets it in every trial (--lr; space.* in "
            "a job)") in run.stderr
    assert not (tmp_path / "tuning").exists() and Registry(str(tmp_path / "registry")).versions() == []


def test_trials_failing_alike_say_their_error_once():
    from cellseg.tune import NoTrialFinished, TrialResult, best_trial

    results = [TrialResult(number=n, params={}, status="failed", error=e)
               for n, e in [(3, "OSError: disk full"), (1, "OSError: disk full"), (2, "RuntimeError: out of memory")]]
    with pytest.raises(NoTrialFinished) as raised:
        best_trial(results)
    assert str(raised.value) == ("no trial finished, so there is no model to register "
                                 "(trials 1, 3: OSError: disk full; trial 2: RuntimeError: out of memory)")
    assert [r.number for r in raised.value.results] == [3, 1, 2]


@pytest.mark.integration
@needs_no_gpu
def test_the_table_and_summary_artifacts_are_published_when_every_trial_fails(prefect_harness, synthetic_dataset, tmp_path):
    from prefect.artifacts import Artifact

    from cellseg.config import SearchSpace, TrainConfig
    from cellseg.flows.tune import tune_unet
    from cellseg.jobs import TuneJob
    from cellseg.tune import NoTrialFinished

    job = TuneJob(
        images_url=str(synthetic_dataset / "images"), masks_url=str(synthetic_dataset / "labels"),
        registry_url=str(tmp_path / "registry"), cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "tuning"),
        trials=2, max_parallel_trials=1, space=SearchSpace(learning_rate=[1e-3, 3e-3], base_width=[8], depth=[2],
                                                            dropout=[0.0], loss=["bce"], augmentation=["flips"]),
        training=TrainConfig(epochs=1, patch_size=64, device="cuda:63"),
    )
    with pytest.raises(NoTrialFinished, match=f"trials 1, 2: {MISSING_GPU}"):
        tune_unet(job)
    table = Artifact.get("tune-unet-trials")
    assert table is not None and table.data.count(MISSING_GPU) == 2
    summary = Artifact.get("tune-unet-summary")
    assert summary is not None and summary.data.startswith("## tune-unet: no trial finished, no model registered")
    assert f"trials 1, 2: {MISSING_GPU}" in summary.data and summary.data.count(MISSING_GPU) == 3
    assert Registry(str(tmp_path / "registry")).versions() == []


def _stop_a_long_tune(synthetic_dataset: Path, tmp_path: Path, stop: signal.Signals, whole_group: bool,
                      ) -> tuple[int, str, list[int]]:
    """Start a tune of two long trials as from a shell (`stop` handled by default), send `stop` once
    each trial has written an epoch (to the command's process group, as Ctrl-C goes, or to the
    command alone, as `kill PID` does): (exit status, stderr, the trial processes still alive
    10 s after the command ended, looked at before this clean-up kills what is left)."""
    import psutil

    env = {key: value for key, value in os.environ.items() if not key.startswith(("CELLSEG_", "PREFECT_API_URL"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect")}
    as_from_a_shell = (f"import os, signal, sys; signal.signal(signal.{stop.name}, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])")
    long_training = '{"epochs": 500, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}'
    command = [str(Path(sys.executable).parent / "cellseg"),
               *_tune(synthetic_dataset, tmp_path, "--trials", "2", "--parallel", "2", "--training-json", long_training)]
    run = subprocess.Popen([sys.executable, "-c", as_from_a_shell, *command], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=whole_group)  # a terminal's group, for Ctrl-C
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while run.poll() is None and time.monotonic() < deadline and not list(tmp_path.glob("tuning/*/trial-*/last.pt")):
            time.sleep(0.1)
        children = psutil.Process(run.pid).children(recursive=True)
        trials = [child for child in children if "multiprocessing.spawn" in " ".join(child.cmdline())]
        assert len(trials) == 2
        if whole_group:
            os.killpg(run.pid, stop)
        else:
            run.send_signal(stop)
        _, stderr = run.communicate(timeout=90)
        _, alive = psutil.wait_procs(trials, timeout=10)
        still_running = [child.pid for child in alive if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        for child in children:
            if child.is_running():
                child.kill()
    return run.returncode, stderr, still_running


@pytest.mark.integration
def test_ctrl_c_stops_tune_and_its_trials_with_status_130_and_a_rerun_works(synthetic_dataset, tmp_path):
    status, stderr, alive = _stop_a_long_tune(synthetic_dataset, tmp_path, signal.SIGINT, whole_group=True)
    assert status == 130, stderr
    [folder] = (tmp_path / "tuning").iterdir()
    assert stderr.strip().splitlines()[-2] == (
        f"cellseg tune: interrupted; nothing was registered, and the trials' folders so far are left in "
        f"{tmp_path / 'tuning' / folder.name}; run the same command again to search anew")
    assert not alive
    assert Registry(str(tmp_path / "registry")).versions() == []

    rerun = cellseg(*_tune(synthetic_dataset, tmp_path, "--trials", "1", "--parallel", "1", "--training-json",
                           TINY_TRAINING), env=_env(tmp_path))
    assert "best: trial" in rerun.stdout
    assert len(Registry(str(tmp_path / "registry")).versions()) == 1


@pytest.mark.integration
def test_tune_says_when_fewer_trials_ran_than_asked_and_what_it_registered(synthetic_dataset, tmp_path):
    run = cellseg(*_tune(synthetic_dataset, tmp_path, "--trials", "3", "--parallel", "2", "--training-json",
                         TINY_TRAINING), env=_env(tmp_path))
    assert "3 trials asked for, but the search space has 2 points: each runs once" in run.stderr
    lines = run.stdout.splitlines()
    assert lines[-2] == "2 trials ran, of 3 asked for: the search grid has only 2 points; 2 done, 0 failed"
    [meta] = Registry(str(tmp_path / "registry")).versions()
    best = lines[1].split()  # the table is best first
    assert lines[-1] == (
        f"best: trial {best[0]} (val Dice {meta.metrics['val_dice']:.4f}; learning_rate {float(best[1])}, "
        f"base_width 8, depth 2, dropout 0.0, loss bce, augmentation flips, border_weight 0.0), registered as "
        f"{meta.version} in {tmp_path / 'registry'}; not made current (cellseg models promote --registry "
        f"{tmp_path / 'registry'} {meta.version} does)")
    # The flow's log: each trial once as it ends (its task said it again), and the version's state.
    assert len([line for line in run.stderr.splitlines() if " done, val Dice " in line]) == 2, run.stderr
    assert (f"registered as {meta.version}; not made current (cellseg models promote --registry "
            f"{tmp_path / 'registry'} {meta.version} does)") in run.stderr


@pytest.mark.integration
def test_sigterm_to_tune_alone_ends_its_trials_too_with_status_143(synthetic_dataset, tmp_path):
    """`kill PID` or `timeout` signals the command only, not its trial processes: they are ended
    too, by tune-unet (tests/test_cancellation.py checks that part alone) and by the command's
    clean-up after it (before, they trained on, orphaned, and the command died without a line)."""
    status, stderr, alive = _stop_a_long_tune(synthetic_dataset, tmp_path, signal.SIGTERM, whole_group=False)
    assert status == 143, stderr
    [folder] = (tmp_path / "tuning").iterdir()
    assert (f"cellseg tune: stopped by SIGTERM; nothing was registered, and the trials' folders so far are left in "
            f"{tmp_path / 'tuning' / folder.name}; run the same command again to search anew") in stderr.splitlines()
    assert not alive
    assert Registry(str(tmp_path / "registry")).versions() == []
