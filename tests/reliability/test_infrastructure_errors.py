"""Storage that cannot be used: an endpoint that accepts connections and never answers (http and
S3), one that refuses them, S3 without credentials, access denied, a missing bucket, and gs:// or
az:// without their fsspec package. Each `cellseg predict` ends in bounded time with exit status
2 and one line naming the URL and the cause, writes no store and shows no secret.

Interpreter start-up takes most of a `cellseg` run on a loaded machine, so the cases run in one
subprocess, each through the command's entry point (`cellseg` is `sys.exit(cellseg.cli.main())`)
with its own environment, and time only their own work; beside it, the S3 black hole also runs
as the installed `cellseg` command.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from benchmarks.servers import black_hole
from tests.conftest import REPO_ROOT
from tests.reliability.faulty_proxy import Fault, FaultyProxy

pytestmark = pytest.mark.integration

SECRET = "infra-test-secret-value"
# Small limits, so that a black hole fails in seconds: 2 tries of 1 s each, plus botocore's backoff.
LIMITS = {"CELLSEG_STORAGE_TIMEOUTS__CONNECT_SECONDS": "1", "CELLSEG_STORAGE_TIMEOUTS__READ_SECONDS": "1",
          "CELLSEG_STORAGE_TIMEOUTS__ATTEMPTS": "2"}
NO_AWS_FILES = {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "AWS_EC2_METADATA_DISABLED": "true"}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "infra-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
# A case's own work (the model is loaded by the first case): 2 tries of 1 s and botocore's backoff
# between them (at most 2 s) fit many times over. Before the limits, a black hole took 305-424 s.
CASE_SECONDS = 30
PROCESS_SECONDS = 180  # a whole `cellseg` run, start-up included, on a loaded machine
# The flows' storage tasks retry what may pass (a refused connection, a name not found) after
# 2, 10 and 30 s: an operator's run rides out a restarting endpoint.
TASK_RETRY_SECONDS = 42
MISSING_PACKAGES = {"gs without gcsfs": "gcsfs", "az without adlfs": "adlfs"}


def refused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


@contextmanager
def s3_answering(status: int, code: str) -> Iterator[str]:
    """An S3 endpoint that answers every request with the error `code`; yields its URL."""
    proxy = FaultyProxy(f"http://127.0.0.1:{refused_port()}", [Fault(code, "", status=status, code=code, times=None)])
    with proxy.running():
        yield proxy.url


def environment(env: dict[str, str]) -> dict[str, str]:
    """This environment less its CELLSEG_* and AWS_* variables, with no AWS files or instance metadata, and `env`."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("CELLSEG_", "AWS_"))}
    return {**clean, **NO_AWS_FILES, **env}


def drive() -> None:
    """In a subprocess: run `cellseg.cli.main` for each case read from stdin ({name: [argv, env]}),
    each with exactly its environment, and print {name: outcome} as JSON."""
    from cellseg.cli import main

    outcomes = {}
    for name, (argv, env) in json.loads(sys.stdin.read()).items():
        os.environ.clear()
        os.environ.update(env)
        logging.getLogger().handlers.clear()  # `main` points its log handler at this case's stderr
        stdout, stderr = io.StringIO(), io.StringIO()
        started = time.monotonic()
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                status = main(argv)
            except BaseException:  # noqa: BLE001 - what the real command would print before dying
                stderr.write(traceback.format_exc())
                status = 1
        outcomes[name] = {"status": status, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                          "seconds": time.monotonic() - started}
    print(json.dumps(outcomes))


@pytest.fixture(scope="module")
def inputs(quick_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(an untrained small checkpoint, a folder of three images)."""
    from cellseg.synth import write_dataset

    root = tmp_path_factory.mktemp("infra")
    write_dataset(str(root / "data"), count=3, size=64, seed=1)
    return quick_checkpoint, root / "data" / "images"


@pytest.fixture(scope="module")
def outcomes(inputs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """{case: (images URL, store URL, the URL the error must name, fragments it must hold), outcome}
    for every case, and the installed command's run against an S3 black hole ("cellseg command")."""
    checkpoint, images = inputs
    out = tmp_path_factory.mktemp("stores")
    with ExitStack() as servers:
        ports = {name: servers.enter_context(black_hole()) for name in ("http", "s3", "no credentials", "command")}
        denied = servers.enter_context(s3_answering(403, "AccessDenied"))
        no_bucket = servers.enter_context(s3_answering(404, "NoSuchBucket"))
        refused = refused_port()
        s3 = {**CREDENTIALS, **LIMITS}
        http = f"http://127.0.0.1:{ports['http']}"
        cases: dict[str, tuple[str, str, dict[str, str], tuple[str, ...]]] = {
            "http black hole": (f"{http}/incoming/", str(out / "a.zarr"), LIMITS, ("timed out after 1 s", http)),
            "s3 black hole": ("s3://lab/incoming", str(out / "b.zarr"),
                              {**s3, "CELLSEG_STORAGE__S3__ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}"},
                              ("timed out after 1 s", f"http://127.0.0.1:{ports['s3']}", "tried 2 times")),
            "s3 refused": ("s3://lab/incoming", str(out / "c.zarr"),
                           {**s3, "CELLSEG_STORAGE__S3__ENDPOINT_URL": f"http://127.0.0.1:{refused}"},
                           ("cannot connect to", f"http://127.0.0.1:{refused}", "connection refused")),
            "s3 without credentials": ("s3://lab/incoming", str(out / "d.zarr"),
                                       {**LIMITS, "CELLSEG_STORAGE__S3__ENDPOINT_URL":
                                        f"http://127.0.0.1:{ports['no credentials']}"},
                                       ("no credentials", "AWS_ACCESS_KEY_ID")),
            "s3 access denied": ("s3://lab/incoming", str(out / "e.zarr"),
                                 {**s3, "CELLSEG_STORAGE__S3__ENDPOINT_URL": denied}, ("access denied",)),
            "s3 missing bucket": (str(images), "s3://no-such-bucket/out.zarr",
                                  {**s3, "CELLSEG_STORAGE__S3__ENDPOINT_URL": no_bucket},
                                  ("bucket 'no-such-bucket' does not exist (NoSuchBucket): check its name",)),
            "gs without gcsfs": ("gs://lab/incoming", str(out / "g.zarr"), {}, ("gs:// needs gcsfs: pip install gcsfs",)),
            "az without adlfs": (str(images), "az://lab/out.zarr", {}, ("az:// needs adlfs: pip install adlfs",)),
        }
        argv = {name: ["predict", "--model", str(checkpoint), "--images", images_url, "--out", store]
                for name, (images_url, store, _, _) in cases.items()}
        command_env = environment({**s3, "CELLSEG_STORAGE__S3__ENDPOINT_URL": f"http://127.0.0.1:{ports['command']}"})
        command = subprocess.Popen(
            [str(Path(sys.executable).parent / "cellseg"), "predict", "--model", str(checkpoint),
             "--images", "s3://lab/incoming", "--out", str(out / "command.zarr")],
            env=command_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        driven = subprocess.run(
            [sys.executable, "-c", "from tests.reliability.test_infrastructure_errors import drive; drive()"],
            input=json.dumps({name: [argv[name], environment(env)] for name, (_, _, env, _) in cases.items()}),
            cwd=REPO_ROOT, env=environment({}), capture_output=True, text=True, timeout=PROCESS_SECONDS, check=False)
        assert driven.returncode == 0, driven.stderr
        stdout, stderr = command.communicate(timeout=PROCESS_SECONDS)
        seconds = time.monotonic() - started
    results = {name: {"case": (images_url, store, store if name in ("s3 missing bucket", "az without adlfs")
                               else images_url, fragments), **json.loads(driven.stdout)[name]}
               for name, (images_url, store, _, fragments) in cases.items()}
    results["cellseg command"] = {
        "case": ("s3://lab/incoming", str(out / "command.zarr"), "s3://lab/incoming",
                 ("timed out after 1 s", f"http://127.0.0.1:{ports['command']}", "tried 2 times")),
        "status": command.returncode, "stdout": stdout, "stderr": stderr, "seconds": seconds}
    return results


@pytest.mark.parametrize("name", ["http black hole", "s3 black hole", "s3 refused", "s3 without credentials",
                                  "s3 access denied", "s3 missing bucket", "gs without gcsfs", "az without adlfs",
                                  "cellseg command"])
def test_storage_that_cannot_be_used_is_one_line_naming_the_url_and_the_cause(outcomes, name):
    package = MISSING_PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    outcome = outcomes[name]
    _images, store, url, fragments = outcome["case"]
    assert outcome["status"] == 2, outcome["stderr"]
    assert "Traceback" not in outcome["stderr"]
    errors = [line for line in outcome["stderr"].splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("cellseg predict: error: "), outcome["stderr"]
    assert f"'{url}'" in errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    if name == "cellseg command":  # the wait is said as it happens: minutes of silence looked hung
        assert f"'{fragments[1]}' did not answer in time (timed-out tries so far: 1)" in outcome["stderr"]
    limit = PROCESS_SECONDS if name == "cellseg command" else CASE_SECONDS
    assert outcome["seconds"] < limit, f"{name} took {outcome['seconds']:.0f} s"
    assert SECRET not in outcome["stdout"] + outcome["stderr"]
    if "://" not in store:
        assert not Path(store).exists(), "a run that could not read its images created a store"


def test_flow_tasks_retry_what_may_pass_and_never_what_needs_a_fix():
    from prefect.states import Failed

    from cellseg.flows._common import retry_unless_bad_input
    from cellseg.storage_errors import StorageError

    def retried(error: Exception) -> bool:
        return retry_unless_bad_input(None, None, Failed(data=error))  # type: ignore[arg-type]

    assert retried(StorageError("'s3://b/x': timed out", transient=True))
    assert not retried(StorageError("'s3://b/x': no credentials"))
    assert not retried(FileNotFoundError("s3://b/x"))
    assert retried(ConnectionResetError("worker lost"))


def test_errors_a_task_raises_on_a_dask_worker_reach_the_flow_whole():
    """Dask pickles a task's exception back to the flow: each error of cellseg's own with fields
    beyond its message must come back with them, not as a TypeError from unpickling it."""
    import pickle

    from cellseg.segment import StoppedWriting
    from cellseg.storage_errors import StorageError
    from cellseg.store_checks import DamagedImage, StoreWriteError

    cause = StoreWriteError("cannot write to results store '/data/out.zarr': No space left on device")
    for error, fields in ((StoppedWriting(cause, 2, 4), ("written", "images")),
                          (DamagedImage("/data/out.zarr", "a0", "its mask cannot be read", undecodable=True),
                           ("url", "image_id", "problem", "undecodable")),
                          (StorageError("'s3://b/x': timed out", transient=True), ("transient",))):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert all(getattr(back, name) == getattr(error, name) for name in fields), type(error).__name__
    assert str(pickle.loads(pickle.dumps(StoppedWriting(cause, 2, 4))).cause) == str(cause)

def test_a_registry_that_cannot_be_reached_is_named_by_its_url(quick_checkpoint):
    from cellseg.registry import Registry
    from cellseg.storage_errors import StorageError

    port = refused_port()
    url = "s3://infra-registry/models"
    registry = Registry(url, {"endpoint_url": f"http://127.0.0.1:{port}", "key": "infra-test-key", "secret": SECRET,
                              "config_kwargs": {"connect_timeout": 1, "retries": {"total_max_attempts": 1}}})
    calls = {"register": lambda: registry.register(str(quick_checkpoint)), "versions": registry.versions,
             "current": registry.current, "promote": lambda: registry.promote("20250101-000000-0123abcd"),
             "load": registry.load}
    for name, call in calls.items():
        with pytest.raises(StorageError) as raised:
            call()
        assert str(raised.value).startswith(f"'{url}': cannot connect to http://127.0.0.1:{port}"), (name, raised.value)
        assert raised.value.transient


@pytest.fixture(scope="module")
def flow_outcomes(prefect_server, inputs, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """{case: outcome} of `cellseg flow` commands run at once: segment-images reading from an S3
    endpoint that refuses connections and train-unet from one whose host name does not resolve
    (as with no endpoint set and no network), against a real Prefect server; and segment-images
    with a Prefect API that refuses connections, or with a temporary Prefect server given no time
    to start. Each outcome has the URL it could not reach (None: no URL) and what its error must say."""
    checkpoint, images = inputs
    out = tmp_path_factory.mktemp("flows")
    bucket = f"s3://infra-flows-{time.monotonic_ns() % 10**8}"
    refused = f"http://127.0.0.1:{refused_port()}"
    storage = {**CREDENTIALS, **LIMITS, **prefect_server}
    local = ["segment-images", "--source", str(images), "--model", str(checkpoint), "--store"]
    cases: dict[str, tuple[list[str], dict[str, str], str | None, str]] = {
        "segment-images": (["segment-images", "--source", f"{bucket}/incoming", "--store", str(out / "s.zarr"),
                            "--model", str(checkpoint)], {**storage, "CELLSEG_STORAGE__S3__ENDPOINT_URL": refused},
                           f"{bucket}/incoming", f"cannot connect to {refused} (connection refused"),
        "train-unet": (["train-unet", "--images", f"{bucket}/images", "--masks", f"{bucket}/masks",
                        "--registry", str(out / "registry"), "--cache-dir", str(out / "cache"),
                        "--work-dir", str(out / "work"), "--epochs", "1"],
                       {**storage, "CELLSEG_STORAGE__S3__ENDPOINT_URL": "http://cellseg-infra-test.invalid"},
                       f"{bucket}/images", "host name not found"),
        "Prefect API refused": ([*local, str(out / "a.zarr")], {**prefect_server, "PREFECT_API_URL": f"{refused}/api"},
                                None, f"the Prefect API at {refused}/api cannot be reached"),
        "temporary server too slow": (
            [*local, str(out / "b.zarr")],
            {"PREFECT_HOME": str(out / "prefect"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0"},
            None, "the temporary Prefect server (PREFECT_API_URL is not set) did not start within 0 s"),
    }
    started = time.monotonic()
    commands = {name: subprocess.Popen(
        [str(Path(sys.executable).parent / "cellseg"), "flow", *argv],
        env={key: value for key, value in environment(env).items() if key != "PREFECT_API_URL" or key in env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, (argv, env, _, _) in cases.items()}
    outcomes = {}
    for name, command in commands.items():
        stdout, stderr = command.communicate(timeout=PROCESS_SECONDS + TASK_RETRY_SECONDS)
        outcomes[name] = {"status": command.returncode, "stdout": stdout, "stderr": stderr, "url": cases[name][2],
                          "says": cases[name][3], "seconds": time.monotonic() - started,
                          "says_first": f"cellseg flow {cases[name][0][0]}: error: "}
    return outcomes


@pytest.mark.parametrize("case", ["segment-images", "train-unet", "Prefect API refused", "temporary server too slow"])
def test_a_flow_that_cannot_reach_its_storage_or_api_exits_with_one_line_naming_it(flow_outcomes, case):
    outcome = flow_outcomes[case]
    assert outcome["status"] == 2, outcome["stderr"]
    assert "Traceback" not in outcome["stderr"], outcome["stderr"]
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith(outcome["says_first"])]
    assert len(errors) == 1, outcome["stderr"]
    named = f"'{outcome['url']}': " if outcome["url"] else ""
    assert errors[0].startswith(outcome["says_first"] + named) and outcome["says"] in errors[0], errors[0]
    assert outcome["seconds"] < PROCESS_SECONDS + TASK_RETRY_SECONDS, f"{case} took {outcome['seconds']:.0f} s"
    assert SECRET not in outcome["stdout"] + outcome["stderr"]


@pytest.mark.parametrize(("flow", "artifact"), [("segment-images", "segment-images-summary"),
                                                ("train-unet", "train-unet-failure")])
def test_the_failed_run_says_that_line_as_its_state_message_and_artifact(flow_outcomes, prefect_server, flow, artifact):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters
    from prefect.settings import PREFECT_API_URL, temporary_settings

    outcome = flow_outcomes[flow]
    line = outcome["stderr"].split(outcome["says_first"], 1)[1].splitlines()[0]
    url_field = "source_url" if flow == "segment-images" else "images_url"
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = [run for run in client.read_flow_runs(flow_filter=filters.FlowFilter(name=filters.FlowFilterName(any_=[flow])))
                if run.parameters["job"][url_field] == outcome["url"]]
        assert len(runs) == 1, runs
        artifacts = client.read_artifacts(
            artifact_filter=filters.ArtifactFilter(key=filters.ArtifactFilterKey(any_=[artifact])),
            flow_run_filter=filters.FlowRunFilter(id=filters.FlowRunFilterId(any_=[runs[0].id])))
    state = runs[0].state
    assert state is not None and state.is_failed() and state.message == line, state
    assert len(artifacts) == 1 and line in str(artifacts[0].data), artifacts
