"""One trial of a hyperparameter search (`run_trial`): `run_training` with the trial's configs,
reported as a row of the trial table whether it finished or failed."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Collection, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

from cellseg.io import PARTIAL_FILE_PREFIX
from cellseg.job_config import TuneJob
from cellseg.jobs_training import run_training
from cellseg.pairs import ImagePair
from cellseg.redact import redact_text
from cellseg.runtime import set_threads
from cellseg.tune import Trial, TrialResult

logger = logging.getLogger("cellseg.jobs")  # the jobs' one logger, whichever of their modules speaks


def run_trial(job: TuneJob, trial: Trial, out_dir: str | Path, pairs: Sequence[ImagePair] | None = None,
              threads: int | None = None) -> TrialResult:
    """Train one trial of a search (`run_training` with the trial's configs) into `out_dir`. A
    trial that raises is reported as failed with its error, so one bad point does not end the search."""
    set_threads(threads)
    started = time.monotonic()
    try:
        outcome = run_training(job.trial_job(trial), out_dir, pairs)
    except Exception as error:  # noqa: BLE001 - reported in the trial table; the search goes on
        described = redact_text(f"{type(error).__name__}: {error}")  # shown in the trial table and artifacts
        logger.warning("trial %d %s failed: %s", trial.number, trial.params, described)
        return TrialResult(number=trial.number, params=trial.params, status="failed", error=described)
    result = outcome.result
    return TrialResult(
        number=trial.number,
        params=trial.params,
        status="done",
        val_dice=result.best_metrics.get("val_dice"),
        metrics={k: v for k, v in result.best_metrics.items() if k.startswith("val_")},
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stop_reason=result.stop_reason,
        seconds=round(time.monotonic() - started, 1),
        checkpoint=str(result.best_checkpoint),
    )


def stop_trial_processes(run_dir: str | Path | None = None, grace_seconds: float = 10.0,
                         spared: Collection[BaseProcess] = ()) -> int:
    """End this process's trial processes (its `multiprocessing` children but those of `spared`,
    the ones it had before the search: a label-worker pool, say) when a search stops early
    (cancelled, SIGTERM, Ctrl-C): SIGTERM, then SIGKILL to any still alive `grace_seconds` later. A
    pool's own shutdown would wait for the trials in flight to finish training, and a process
    killed with its parent would leave them training on with no one to take their results.
    Half-written files the trials leave under `run_dir` (a checkpoint's temporary file) are
    removed; their folders stay. Returns how many processes were ended."""
    children = [child for child in multiprocessing.active_children() if child not in spared]
    for child in children:
        child.terminate()
    deadline = time.monotonic() + grace_seconds
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(timeout=5)
    if run_dir is not None and Path(run_dir).is_dir():
        for partial in Path(run_dir).rglob(f"{PARTIAL_FILE_PREFIX}*"):
            partial.unlink(missing_ok=True)
    return len(children)
