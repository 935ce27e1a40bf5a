"""What the flows share: the worker's settings, the retry policy and small report formatting.

Object-storage endpoints and credentials are never flow parameters: s3fs reads them from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and fsspec configuration
(FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/), and `configure_storage` adds the `storage` section of
cellseg's settings (CELLSEG_STORAGE__S3__ENDPOINT_URL=..., or the file named by CELLSEG_CONFIG) as
the worker sees them, so they stay out of run parameters, logs and artifacts. The job's fields a
run was not given come from the same settings (`worker_job`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from prefect import Task, get_run_logger, tags
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, State
from prefect.task_runners import TaskRunner

from cellseg.job_config import Job, with_settings
from cellseg.redact import redact_text, redact_url
from cellseg.storage_errors import StorageError, storage_error

if TYPE_CHECKING:
    from cellseg.settings import CellsegSettings

# Failures that a retry cannot fix: cellseg reports bad files, settings and checkpoints as
# ValueError subclasses; a missing bucket/directory and denied access are permanent too. Of
# storage that cannot be reached (StorageError), only what may pass (timeouts, refused
# connections) is retried.
PERMANENT_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def configure_storage() -> CellsegSettings:
    """Hand the worker's cellseg storage settings (environment, CELLSEG_CONFIG file) to fsspec;
    the settings, for what else the run takes from them."""
    from cellseg.settings import load_settings

    settings = load_settings()
    settings.apply_storage()
    return settings


def worker_job(job: Job) -> Job:
    """The run's job completed from this worker's settings (`with_settings`: registry, model,
    training and predict settings, `local_root`), storage configured, and where it keeps things
    logged: a relative folder is this worker's own, under the directory the run started in."""
    job = with_settings(job, configure_storage())
    places = {name: getattr(job, name) for name in ("registry_url", "cache_dir", "work_dir") if hasattr(job, name)}
    get_run_logger().info("; ".join(
        f"{name.removesuffix('_url').replace('_', ' ')} {redact_url(value)}"
        + ("" if "://" in value or Path(value).is_absolute() else f" ({Path(value).resolve()}, this worker's own)")
        for name, value in places.items()))
    return job


def job_from_variable(name: str, job_type: type[Job]) -> Job:
    """The job a Prefect variable holds (a JSON object of the job's fields), read when the run
    starts: `prefect variable set NAME '{...}' --overwrite` changes the next run, no redeploy."""
    from prefect.variables import Variable
    from pydantic import ValidationError

    from cellseg.settings import describe_invalid

    value = Variable.get(name, default=None)
    example = '{"source_url": "s3://lab/incoming", "store_url": "s3://lab/nightly.zarr"}'
    if value is None:
        raise ValueError(f"the Prefect variable '{name}' is not set: prefect variable set {name} '{example}'")
    try:
        return job_type.model_validate(json.loads(value) if isinstance(value, str) else value)
    except (ValueError, ValidationError) as error:
        problem = describe_invalid(error) if isinstance(error, ValidationError) else "not a JSON object"
        raise ValueError(f"the Prefect variable '{name}' is not a {job_type.__name__} "
                         f"(e.g. {example}): {redact_text(problem)}") from None


def one_line_failure(error: BaseException) -> str | None:
    """What a run that failed with `error` says in one line: a refused input, setting or model
    (cellseg's ValueErrors name the culprit) or a storage fault named by its URL; None for
    anything else, whose traceback matters."""
    message = str(error)
    if isinstance(error, ValueError | FileNotFoundError) and message and "\n" not in message:
        return redact_text(message)
    translated = storage_error(None, error)  # botocore's and aiohttp's own, raised where no URL was known
    return None if translated is None else redact_text(str(translated))


P = ParamSpec("P")
R = TypeVar("R")


def failing_in_one_line(title: str, artifact_key: str, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`work(*args, **kwargs)`, the body of a flow; when it fails with an error `one_line_failure`
    puts in one line, the run ends Failed with that line as its state message and as the markdown
    artifact `artifact_key`, headed `title`. Other errors fail the run as Prefect does, traceback
    and all. A flow called in a process (`cellseg flow ...`) raises the error either way."""
    try:
        return work(*args, **kwargs)
    except Exception as error:
        line = one_line_failure(error)
        if line is None:
            raise
        create_markdown_artifact(key=artifact_key, markdown=f"## {title} failed\n\n**{line}**",
                                 description=f"{title}: why the run failed")
        _log_engine_error_in_one_line(error, line)
        return cast("R", Failed(message=line, data=error))


def _log_engine_error_in_one_line(error: BaseException, line: str) -> None:
    """Have the engine's record of `error` say `line` alone (`_EngineErrorInOneLine`). Only the
    latest failure's filter stays: the engine logs the error as soon as the run returns, and an
    older filter would keep its error, with every frame of its traceback, alive in this process."""
    logger = logging.getLogger("prefect.flow_runs")
    for older in [found for found in logger.filters if isinstance(found, _EngineErrorInOneLine)]:
        logger.removeFilter(older)
    logger.addFilter(_EngineErrorInOneLine(error, line))


class _EngineErrorInOneLine(logging.Filter):
    """A deployment run's engine re-raises the error of a Failed state and logs it with its
    traceback ("Engine execution exited with unexpected exception"); for an error already put in
    one line, that record becomes the line alone."""

    def __init__(self, error: BaseException, line: str):
        super().__init__()
        self.error, self.line = error, line

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            record.msg, record.args, record.exc_info, record.exc_text = f"the run failed: {self.line}", (), None, None
        return True


class _EventsServiceStopped(logging.Filter):
    """Prefect's events service can stop (its connection to the API lost, the process ending)
    between `emit_event` finding it and sending to it; `emit_event` then logs the event with a
    traceback. A flow run's heartbeat lost so only keeps a running flow from looking alive, which
    a run ending or failing at that moment does not need: dropped. Any other event lost so is said
    in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if not (isinstance(error, RuntimeError) and "stopped service instance" in str(error)
                and message.startswith("Error emitting event: ")):
            return True
        if message.endswith("prefect.flow-run.heartbeat"):
            return False
        record.msg, record.args, record.exc_info, record.exc_text = (
            f"{message.removeprefix('Error emitting event: ')} was not sent: Prefect's events service had stopped",
            (), None, None)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("prefect.events.utilities").addFilter(_EventsServiceStopped())


def with_run_tags() -> AbstractContextManager[set[str]]:
    """Flow and task runs started inside (the inner flows ingest-dataset, segment-large-image and
    train-trials; the segment-shard tasks) carry this run's tags, so whatever watches the run by
    tag (the zombie-run automation of deployments/automations.yaml, tag concurrency limits)
    watches them too."""
    from prefect.runtime import flow_run

    return tags(*(flow_run.get_tags() or []))


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (network, storage, killed workers), never permanent ones.

    Storage calls already retry timeouts, throttling and 5xx answers with backoff inside
    botocore (`storage_timeouts` in the settings); these task retries cover what outlasts that
    (a worker lost, a server slow for a while). An endpoint that took no connection in any of
    those attempts is down: one that refused is tried once more after the task's first delay (a
    restart, a network blip), one that timed out connecting not at all (its attempts already
    waited attempts x connect seconds), so a dead endpoint fails the run in well under a minute
    rather than after every retry's delay. One that took the connections and answered none of
    them in this process (stalled, hung) is tried once more too: each try waits attempts x read
    seconds. Missing credentials, credentials the endpoint refuses, denied access or a missing
    package fail at once.
    """
    error = state.result(raise_on_failure=False)
    if isinstance(error, BaseException) and not isinstance(error, StorageError):
        error = storage_error(None, error) or error  # botocore's and aiohttp's own, raised where no URL was known
    if isinstance(error, StorageError):
        if error.unreachable:
            return error.transient and task_run.run_count <= 1
        return error.transient
    return not isinstance(error, PERMANENT_ERRORS)


def task_runner(dask_address: str | None, local: TaskRunner) -> TaskRunner:
    """A DaskTaskRunner on the scheduler at `dask_address` when one is given, else `local`."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return local


# How long a run whose worker died may take to end after SIGTERM (tasks in flight finish their
# current work first) before it is reported Crashed and killed.
WORKER_LOSS_GRACE_SECONDS = 30.0
_watched_runs: set[str] = set()


def stop_with_worker(grace_seconds: float = WORKER_LOSS_GRACE_SECONDS, poll_seconds: float = 1.0) -> None:
    """End this flow run when the process that started it (a Prefect worker, `cellseg serve`) dies.

    A process worker starts each run in a session of its own, so `kill -9` of the worker would leave
    the run working unsupervised. A daemon thread watches the parent process id; once the parent is
    gone it sends this process SIGTERM, which Prefect reports as Crashed when the tasks in flight
    return. A run still alive `grace_seconds` later is reported Crashed and killed with its child
    processes. What was written stays written; a rerun does the rest. Does nothing for a flow
    called in this process (the CLI, tests): only a process started for this very run is watched.
    """
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if (sys.platform == "win32" or run_id is None or run_id in _watched_runs
            or os.environ.get("PREFECT__FLOW_RUN_ID") != run_id):
        return
    _watched_runs.add(run_id)
    # getppid polling, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread* that forked
    # this process exits, and the worker starts runs from whichever thread runs its event loop.
    threading.Thread(target=_end_when_orphaned, name="cellseg-worker-watch", daemon=True,
                     args=(os.getppid(), run_id, get_run_logger(), grace_seconds, poll_seconds)).start()


def _end_when_orphaned(parent: int, run_id: str, logger: Any, grace_seconds: float, poll_seconds: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    _silence_dead_pipes()
    logger.warning("the worker that started this run (pid %d) is gone: ending the run; images and checkpoints "
                   "written so far are kept, and a rerun does the rest", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_seconds)
    message = f"the worker that started this run (pid {parent}) died; the run did not end {grace_seconds:.0f}s after SIGTERM"
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Crashed(message=message))
    except Exception:  # the kill below must happen anyway; the zombie automation marks the run then
        logger.warning("could not report this run Crashed", exc_info=True)
    # The run's own process group (a worker starts each run as a session leader) holds its task
    # processes; anywhere else, only this process is ours to kill.
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _silence_dead_pipes() -> None:
    """Point stdout/stderr that were pipes to the dead parent at /dev/null: writing to a pipe with no
    reader raises (rich's console turns it into SystemExit in whichever thread logs next)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.dup2(devnull, fd)
        except OSError:
            continue
    os.close(devnull)


# What stops a run before its end without any fault of its own: Prefect's SIGTERM bridge raises
# TerminationSignal (a BaseException) in the run's main thread when the run is cancelled (the UI's
# Cancel, `prefect flow-run cancel`) or its process is sent SIGTERM (`systemctl stop`, `docker stop`
# of what started it); Ctrl-C raises KeyboardInterrupt. `except Exception` catches neither.
STOPPED = (TerminationSignal, KeyboardInterrupt)


def warn_now(logger: Any, message: str, *args: object) -> None:
    """Log a warning and ship it to the API at once. Prefect sends a run's log lines in batches every
    few seconds, and a cancelled run is marked Cancelled before its exit sends the rest: the line
    saying what a stopped run kept must be there when its state says it stopped (and a run killed
    30 s after SIGTERM never sends it at all)."""
    from prefect.logging.handlers import APILogHandler

    logger.warning(message, *args)
    APILogHandler().flush()  # at most 5 s; it does not raise where no API is configured


def how_stopped(error: BaseException) -> str:
    """How a run stopped by `error` (one of STOPPED) ended, for its log: 'cancelled' when Prefect
    delivered a cancel (its control channel's intent), else what stopped it."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "cancelled" if _cancelled() else "stopped by SIGTERM"


def _cancelled() -> bool:
    """Whether Prefect told this run's process it is cancelled (before the SIGTERM that stops it)."""
    try:
        from prefect._internal.control_listener import get_intent
    except ImportError:  # a Prefect without the control channel: not known
        return False
    return get_intent() == "cancel"


class _TaskStoppedByCancel(logging.Filter):
    """A cancelled run's SIGTERM interrupts the task its main thread runs (train-model, a trial's
    wait), which Prefect logs as a crash at ERROR ("Crash detected! Execution was aborted by a
    termination signal."). When the run was cancelled, that record says so, as a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= logging.ERROR and "aborted by a termination signal" in record.getMessage()
                and _cancelled()):
            record.msg = ("stopped: its flow run was cancelled" if record.getMessage().startswith("Crash detected")
                          else "Finished in state Crashed: its flow run was cancelled")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("prefect.task_runs").addFilter(_TaskStoppedByCancel())


GPU_LIMIT = "gpu"


@contextmanager
def gpu_slot(on_gpu: bool) -> Iterator[None]:
    """Hold one slot of the Prefect global concurrency limit `gpu` while work runs on a GPU.

    Create the limit once per site (`prefect gcl create gpu --limit 2` for two GPUs) and every
    training, evaluation, tuning trial and GPU segmentation shard waits for a free slot; without
    the limit, or on the CPU, nothing waits.
    """
    if not on_gpu:
        yield
        return
    with concurrency(GPU_LIMIT, occupy=1, strict=False, raise_on_lease_renewal_failure=False):
        yield


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of `rows` restricted to `columns`."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


class ProgressArtifact:
    """A Prefect progress artifact (0-100%) for a long run, shown live in the UI."""

    def __init__(self, key: str, total: int, description: str):
        self.total = max(total, 1)
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def update(self, done: int, description: str | None = None) -> None:
        update_progress_artifact(self.artifact_id, progress=round(100.0 * min(done, self.total) / self.total, 1),
                                 description=description)
