"""Shared fixtures: synthetic datasets, a loopback S3 endpoint (moto's HTTP server), a tiny model."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_ready(is_ready: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    """Poll `is_ready` until it holds; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if is_ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} was not ready after {timeout}s")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server we started in its own session (by its own process id), with its children."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """24 synthetic 96x96 images with masks and labels: images/, masks/, labels/."""
    from cellseg.synth import write_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(str(root), count=24, size=96, seed=0)
    return root


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """URL of a moto S3 server on a free loopback port, with dummy credentials in the environment."""
    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                               start_new_session=True)
    previous = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    # moto accepts any credentials; these name no real account.
    os.environ.update(AWS_ACCESS_KEY_ID="moto-test-key", AWS_SECRET_ACCESS_KEY="moto-test-secret", AWS_DEFAULT_REGION="us-east-1")
    try:
        wait_until_ready(lambda: port_open(port), process, "moto_server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(process)
        log.close()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def s3_bucket(moto_endpoint, request):
    """A fresh bucket on the moto server: (bucket URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": moto_endpoint}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = "test-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.monotonic_ns() % 10**6}"
    fs.mkdir(name)
    return f"s3://{name}", options


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_dataset, tmp_path_factory) -> Path:
    """best.pt of a small U-Net trained for a few epochs on the synthetic dataset."""
    from cellseg.config import ModelConfig, TrainConfig
    from cellseg.data import load_pairs, pair_images_and_masks, split_train_val
    from cellseg.train import train

    model_config = ModelConfig(depth=3, base_width=8)
    config = TrainConfig(epochs=6, patch_size=96, patches_per_image=1, device="cpu", seed=0)
    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.2, 0)
    out = tmp_path_factory.mktemp("tiny_model")
    train(load_pairs(train_pairs, model_config.normalization), load_pairs(val_pairs, model_config.normalization),
          out, model_config, config)
    return out / "best.pt"


def shared_dataset(name: str) -> Path:
    """A dataset under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: flows in this process run against a temporary SQLite API."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@contextlib.contextmanager
def running_prefect_server(home: Path):
    """Start a real `prefect server` (SQLite under `home`) on a free port; yields its client environment."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_PROFILE", None)
    log = open(home / "server.log", "wb")
    executable = str(Path(sys.executable).parent / "prefect")
    process = subprocess.Popen(
        [executable, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=log, start_new_session=True,
    )
    try:
        wait_until_ready(lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), process, "prefect server", 120)
        yield {key: env[key] for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
    finally:
        stop_process_group(process)
        log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server` shared by the session: its environment for subprocesses."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env
