"""What the flows share: the retry policy and small report formatting.

Object-storage endpoints and credentials are never flow parameters: s3fs reads them from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and fsspec configuration
(FSSPEC_S3_ENDPOINT_URL, ~/.config/fsspec/), and `configure_storage` adds the `storage` section of
cellseg's settings (CELLSEG_STORAGE__S3__ENDPOINT_URL=..., or the file named by CELLSEG_CONFIG) as
the worker sees them, so they stay out of run parameters, logs and artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.concurrency.sync import concurrency
from prefect.states import State
from prefect.task_runners import TaskRunner

from cellseg.storage_errors import StorageError

# Failures that a retry cannot fix: cellseg reports bad files, settings and checkpoints as
# ValueError subclasses; a missing bucket/directory and denied access are permanent too. Of
# storage that cannot be reached (StorageError), only what may pass (timeouts, refused
# connections) is retried.
PERMANENT_ERRORS = (ValueError, FileNotFoundError, PermissionError)


def configure_storage() -> None:
    """Hand the worker's cellseg storage settings (environment, CELLSEG_CONFIG file) to fsspec.
    Only `storage` is taken from the settings in flows; everything else is a flow parameter."""
    from cellseg.settings import load_settings

    load_settings().apply_storage()


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (network, storage, killed workers), never permanent ones.

    Storage calls already retry timeouts, throttling and 5xx answers with backoff inside
    botocore (`storage_timeouts` in the settings); these task retries cover what outlasts that
    (a worker lost, a long outage). Missing credentials, denied access or a missing package fail
    at once.
    """
    error = state.result(raise_on_failure=False)
    if isinstance(error, StorageError):
        return error.transient
    return not isinstance(error, PERMANENT_ERRORS)


def task_runner(dask_address: str | None, local: TaskRunner) -> TaskRunner:
    """A DaskTaskRunner on the scheduler at `dask_address` when one is given, else `local`."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return local


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
