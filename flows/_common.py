"""What the flows share: retry policy, object-storage options and small report formatting."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry transient failures (network, storage, killed workers), never bad input.

    cellseg reports bad files, settings and checkpoints as ValueError subclasses; retrying those
    cannot succeed, so they fail at once with their message.
    """
    error = state.result(raise_on_failure=False)
    return not isinstance(error, ValueError)


def storage_options(secret_block: str | None) -> dict[str, Any] | None:
    """fsspec storage options from a Prefect Secret block holding a JSON object, if one is named.

    Without a block, s3fs reads credentials from the environment (AWS_*) and fsspec config
    (FSSPEC_S3_ENDPOINT_URL, ...). The value is loaded inside the task, so it never becomes a
    flow or task parameter and never reaches logs or artifacts.
    """
    if not secret_block:
        return None
    from prefect.blocks.system import Secret

    value = Secret.load(secret_block).get()
    return json.loads(value) if isinstance(value, str) else dict(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of `rows` restricted to `columns`."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
