"""Local servers for tests and benchmarks: a real `prefect server` (SQLite) and moto's S3 server,
each on a free loopback port, each stopped by its own process id."""

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
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
# moto accepts any credentials; these name no real account.
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "moto-test-key", "AWS_SECRET_ACCESS_KEY": "moto-test-secret",
                    "AWS_DEFAULT_REGION": "us-east-1"}


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
    """Stop a server started in its own session (by its own process id), with its children."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def running_prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server` (SQLite under `home`); yields the environment its clients need."""
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
    with open(home / "server.log", "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=log, start_new_session=True,
        )
        try:
            wait_until_ready(lambda: http_ok(f"http://127.0.0.1:{port}/api/health"), process, "prefect server", 120)
            yield {key: env[key] for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK")}
        finally:
            stop_process_group(process)


@contextlib.contextmanager
def running_moto_server(log_dir: Path) -> Iterator[str]:
    """moto's S3 HTTP server; yields its endpoint URL. Credentials: MOTO_CREDENTIALS."""
    executable = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
    if executable is None:
        raise FileNotFoundError("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    with open(log_dir / "moto.log", "wb") as log:
        process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                   start_new_session=True)
        try:
            wait_until_ready(lambda: port_open(port), process, "moto_server")
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process_group(process)
