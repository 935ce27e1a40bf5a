"""SIGTERM, which `kill`, `timeout`, `docker stop` and a batch scheduler's time limit send, stops a
command as cleanly as Ctrl-C: exit status 143, one line saying what is kept, nothing left running.

Before, Python's default ended the process where it stood: no clean-up, no line, and a flow
command's temporary Prefect server (in a session of its own) was left running for good."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest

from cellseg.checkpoint import load_checkpoint
from cellseg.cli_signals import TERMINATED, Terminated, sigterm_as_interrupt, wait_out_a_second_interrupt
from cellseg.store import ResultStore
from cellseg.verify import verify_store
from tests.conftest import cellseg, linked_images
from tests.reliability.runs import CELLSEG, clean_environment

pytestmark = pytest.mark.integration

# Exec the command with SIGTERM handled by default, as from a shell, wherever the test runner's
# worker stands on it (an ignored signal stays ignored across exec).
AS_FROM_A_SHELL = ("import os, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_DFL); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def started(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", AS_FROM_A_SHELL, *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition: Callable[[], bool], run: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while run.poll() is None and time.monotonic() < deadline and not condition():
        time.sleep(0.05)
    assert run.poll() is None, "the command ended before it could be stopped"


def test_sigterm_to_predict_keeps_what_is_written_says_so_and_a_rerun_segments_the_rest(tmp_path, tiny_checkpoint):
    images = linked_images(tmp_path, 200)  # seconds of work, and a rerun that finishes the rest in seconds too
    store = tmp_path / "out.zarr"
    command = [CELLSEG, "predict", "--model", str(tiny_checkpoint), "--images", str(images), "--out", str(store)]
    run = started(command, clean_environment())
    wait_for(lambda: (store / "zarr.json").exists() and bool(ResultStore.open(str(store), mode="r").done_ids()), run)

    run.terminate()  # SIGTERM to the command alone, as `kill PID` and `timeout` send it
    stdout, stderr = run.communicate(timeout=60)

    assert run.returncode == TERMINATED == 143, stderr
    assert stderr.strip().splitlines()[-1] == ("cellseg predict: stopped by SIGTERM; the images written so far are "
                                               "kept: run the same command again to segment the rest")
    assert "Traceback" not in stderr and "segmented" not in stdout
    written = len(ResultStore.open(str(store), mode="r").done_ids())
    assert 0 < written < 200
    assert verify_store(str(store), read_data=True).broken == []
    rerun = cellseg(*command[1:])
    assert f"segmented {200 - written}, skipped {written} already done, failed 0" in rerun.stdout


def test_sigterm_to_train_keeps_the_last_epoch_for_resume(synthetic_dataset, tmp_path):
    out = tmp_path / "model"

    def train(epochs: int) -> list[str]:
        return [CELLSEG, "train", "--images", str(synthetic_dataset / "images"), "--masks",
                str(synthetic_dataset / "masks"), "--out", str(out), "--epochs", str(epochs), "--depth", "2",
                "--base-width", "8", "--patch-size", "96", "--patches-per-image", "6", "--patience", "100",
                "--from-scratch"]

    run = started(train(40), clean_environment())
    wait_for((out / "last.pt").exists, run, seconds=300)

    run.terminate()
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 143, stderr
    kept = load_checkpoint(str(out / "last.pt"))
    assert stderr.strip().splitlines()[-1] == (
        f"cellseg train: stopped by SIGTERM; {out}/last.pt holds epoch {kept.epoch}: `cellseg train --resume --out "
        f"{out}` goes on from it, on the run's images and masks with its settings (--epochs N to train it longer)")
    # As the line says: nothing but the folder, and the number of epochs to reach
    resumed = cellseg("train", "--resume", "--out", str(out), "--epochs", str(kept.epoch + 1), check=False)
    assert resumed.returncode == 0, resumed.stderr
    last = load_checkpoint(str(out / "last.pt"))
    assert last.epoch == kept.epoch + 1 and last.train_config == kept.train_config.model_copy(
        update={"epochs": kept.epoch + 1})


def test_sigterm_to_a_flow_on_its_temporary_server_stops_the_server_too(tmp_path):
    """The temporary server runs in a session of its own (kept from Ctrl-C's way), so only the
    command's exit handlers stop it; SIGTERM's default skipped them and left it running."""
    images = linked_images(tmp_path, 2000)
    env = {key: value for key, value in clean_environment().items() if not key.startswith("PREFECT_API_URL")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    command = [CELLSEG, "flow", "segment-images", "--source", str(images), "--store", str(tmp_path / "r.zarr"),
               "--model-version", "general", "--shard-size", "1000", "--registry", str(tmp_path / "registry")]
    run = started(command, env)
    wait_for(lambda: bool(list(tmp_path.glob("r.zarr/img_*/zarr.json"))), run)
    servers = [process for process in psutil.Process(run.pid).children(recursive=True)
               if "prefect.server.api.server:create_app" in " ".join(process.cmdline())]
    assert servers

    run.terminate()
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == 143, stderr
    assert ("cellseg flow segment-images: stopped by SIGTERM; the images written so far are kept: run the same "
            "command again to segment the rest") in stderr.splitlines() and "Traceback" not in stderr
    psutil.wait_procs(servers, timeout=30)
    assert not [server.pid for server in servers if server.is_running() and server.status() != psutil.STATUS_ZOMBIE]
    assert verify_store(str(tmp_path / "r.zarr"), read_data=True).broken == []


def test_sigterm_to_flow_train_unet_says_where_its_last_epoch_is_kept(synthetic_dataset, tmp_path):
    """The flow command's last line named no kept work: where the run's last.pt is, and the command
    that goes on from it, are in the flow's own line above it."""
    env = {key: value for key, value in clean_environment().items() if not key.startswith("PREFECT_API_URL")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    command = [CELLSEG, "flow", "train-unet", "--images", str(synthetic_dataset / "images"), "--masks",
               str(synthetic_dataset / "masks"), "--registry", str(tmp_path / "registry"), "--work-dir",
               str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "40", "--depth", "2",
               "--base-width", "8", "--patch-size", "96", "--patches-per-image", "6", "--patience", "100",
               "--from-scratch"]
    run = started(command, env)
    wait_for(lambda: bool(list((tmp_path / "work").rglob("last.pt"))), run, seconds=300)

    run.terminate()
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == 143, stderr
    assert ("cellseg flow train-unet: stopped by SIGTERM; once its training had begun, the flow's line above says "
            "what its run kept and how to go on from it") in stderr.splitlines(), stderr
    (last,) = (tmp_path / "work").rglob("last.pt")
    epoch = load_checkpoint(str(last)).epoch  # the one last.pt holds, though history.json may not have it yet
    assert f"{last} holds epoch {epoch}: `cellseg train --resume --out {last.parent}` goes on from it" in stderr, stderr
    assert not (tmp_path / "registry").exists() or not list((tmp_path / "registry").iterdir())


def test_sigterm_is_an_interrupt_once_then_its_default_and_an_ignored_sigterm_stays_ignored():
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next instruction; never reached
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert issubclass(Terminated, KeyboardInterrupt)  # every clean-up of Ctrl-C runs for it

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_after_a_reported_stop_a_second_ctrl_c_is_waited_out_and_a_third_ends_the_process():
    """Called twice on one exit (by `cli.main`, then by the entry point after a command that
    reports its own stop), the second call re-armed the wait after a press: a fourth was needed."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        wait_out_a_second_interrupt()
        second_press = signal.getsignal(signal.SIGINT)
        assert callable(second_press) and second_press is not signal.default_int_handler
        second_press(signal.SIGINT, None)  # raises nothing
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the third press ends the process
        wait_out_a_second_interrupt()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a process started with Ctrl-C ignored keeps it so
        wait_out_a_second_interrupt()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
