"""tune-unet: ingest -> train trials in parallel (each in its own process, or on Dask) -> register
the best by validation Dice, with a table artifact of every trial."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from cellseg.flows._common import (
    STOPPED,
    ProgressArtifact,
    gpu_slot,
    how_stopped,
    markdown_table,
    stop_with_worker,
    task_runner,
    warn_now,
    with_run_tags,
    worker_job,
)
from cellseg.flows.dask_checks import check_dask_workers
from cellseg.flows.ingest import ingest_dataset_flow
from cellseg.flows.train import new_run_dir, register_model
from cellseg.ingest import Manifest
from cellseg.jobs import TuneJob, run_trial
from cellseg.jobs_tune import stop_trial_processes
from cellseg.redact import redact_text, redact_url
from cellseg.registry import Registry
from cellseg.runtime import resolve_device
from cellseg.tune import (
    TABLE_COLUMNS,
    NoTrialFinished,
    Trial,
    TrialResult,
    best_trial,
    check_tuning_dataset,
    plan_trials,
    trial_rows,
    unused_settings,
)
from cellseg.waiting import as_completed_awake


@task(name="train-trial", tags=["gpu"])
def train_trial(job: TuneJob, trial: Trial, manifest_path: str, run_dir: str, threads: int | None) -> dict[str, Any]:
    """Train one trial on the cached dataset (`run_trial`); a failing trial is reported, not raised."""
    get_run_logger().info("trial %d: %s", trial.number, trial.params)
    out_dir = Path(run_dir) / f"trial-{trial.number:03d}"
    if out_dir.exists():  # each run's folder is its own: only an earlier attempt, on a worker lost mid-trial, wrote here
        get_run_logger().warning("trial %d: starting over in %s, which an attempt on a lost worker left", trial.number,
                                 out_dir)
        shutil.rmtree(out_dir)
    with gpu_slot(resolve_device(trial.training.device).type == "cuda"):
        result = run_trial(job, trial, out_dir, Manifest.load(manifest_path).pairs(), threads)
    return result.model_dump(mode="json")  # logged by train-trials as it ends, with the search's progress


@flow(name="train-trials")
def train_trials(job: TuneJob, trials: list[Trial], manifest_path: str, run_dir: str,
                 threads: int | None) -> list[dict[str, Any]]:
    """One train-trial task per trial on this flow's task runner (processes, or Dask), each logged
    as it ends; a trial whose task failed (its worker died, out of memory say) is a failed trial."""
    results = {}
    before = multiprocessing.active_children()  # not trials: spared when the search is stopped
    try:
        futures = train_trial.map(unmapped(job), trials, unmapped(manifest_path), unmapped(run_dir), unmapped(threads))
        trial_of = {future.task_run_id: trial for future, trial in zip(futures, trials, strict=True)}
        progress = ProgressArtifact("tune-unet-progress", len(trials), f"{len(trials)} trials")
        for finished, future in enumerate(as_completed_awake(futures), start=1):
            result = results[future.task_run_id] = _trial_outcome(future, trial_of[future.task_run_id])
            line = f"{finished} of {len(trials)} trials finished"
            get_run_logger().info("trial %d %s: %s", result.number, _trial_line(result), line)
            progress.update(finished, line)
    except TerminationSignal:
        # Cancelled, or SIGTERM: end the trials now. The process pool's exit, next, would wait for
        # them to finish training, past the grace a cancel or `systemctl stop` gives this process
        # before SIGKILL, which leaves them training on, orphaned. (Ctrl-C reaches the trials
        # themselves, in the terminal's process group, and `cellseg tune` ends what is left.)
        stop_trial_processes(run_dir, spared=before)
        raise
    return [results[future.task_run_id].model_dump(mode="json") for future in futures]


def _trial_outcome(future: PrefectFuture[dict[str, Any]], trial: Trial) -> TrialResult:
    try:
        return TrialResult.model_validate(future.result())
    except Exception as error:  # noqa: BLE001 - the search goes on without this trial
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return TrialResult(number=trial.number, params=trial.params, status="failed",
                           error=redact_text(f"{type(error).__name__}: {first_line}"))


def _trial_line(result: TrialResult) -> str:
    if result.status == "done":
        return f"done, val Dice {result.val_dice:.4f}" if result.val_dice is not None else "done"
    return f"failed: {result.error}"


@flow(name="tune-unet")
def tune_unet(job: TuneJob) -> dict[str, Any]:
    """Train `job.trials` points of the search space in parallel, register the best by validation
    Dice (current when `job.promote`) and publish a table of all trials.

    Trials run in local processes, or on the Dask cluster at `dask_address`; there, every worker
    reads the dataset cache and writes its trial under `work_dir`, so both must be on a
    filesystem the workers share."""
    stop_with_worker()
    job = worker_job(job)
    logger = get_run_logger()
    planned = plan_trials(job.space, job.trials, job.seed, job.model, job.training)
    logger.info("%d trials of a %d-point search space, %d at a time", len(planned), job.space.size(),
                job.max_parallel_trials)
    if unused := unused_settings(job.model, job.training):
        logger.warning("%s given but not used: the search space sets %s in every trial (%s; space.* in a job)",
                       ", ".join(unused), "it" if len(unused) == 1 else "them", ", ".join(dict.fromkeys(unused.values())))
    if job.trials > len(planned):
        logger.warning("%d trials asked for, but the search space has %d points: each runs once", job.trials,
                       len(planned))
    Registry(job.registry_url).check_writable()  # before the trials, not after them
    with with_run_tags():
        dataset = ingest_dataset_flow(job.images_url, job.masks_url, job.cache_dir)
    check_tuning_dataset(dataset["pairs"])
    run_dir = new_run_dir(job.work_dir, flow_run.get_name())
    logger.info("trials train into %s", run_dir)
    if job.dask_address:
        Path(run_dir).mkdir(parents=True)
        check_dask_workers(job.dask_address, {"cache_dir": dataset["manifest_path"], "work_dir": run_dir})
    threads = None if job.dask_address else max(1, (os.cpu_count() or 1) // job.max_parallel_trials)
    # Processes, not threads: torch's random state and thread count are per process, so each
    # trial is reproducible on its own and the cores are shared out between trials.
    runner = task_runner(job.dask_address, ProcessPoolTaskRunner(max_workers=job.max_parallel_trials))
    try:
        with with_run_tags():
            trained = train_trials.with_options(task_runner=runner)(job, planned, dataset["manifest_path"], run_dir,
                                                                    threads)
    except STOPPED as stopped:
        warn_now(logger, "tune-unet %s: no model registered; the trials' folders so far are left in %s (a new run "
                 "searches anew in a folder of its own)", how_stopped(stopped), run_dir)
        raise
    results = [TrialResult.model_validate(result) for result in trained]
    rows = trial_rows(results)
    create_table_artifact(key="tune-unet-trials", table=rows, description="tune-unet: every trial, best first")
    try:
        best = best_trial(results)
    except NoTrialFinished as none_finished:
        create_markdown_artifact(
            key="tune-unet-summary",
            markdown=(f"## tune-unet: no trial finished, no model registered\n\n{redact_text(str(none_finished))}\n\n"
                      + markdown_table(rows, TABLE_COLUMNS)),
            description="tune-unet: every trial failed",
        )
        raise
    version = register_model(best.checkpoint, job.registry_url, job.promote)
    logger.info("best: trial %d (val Dice %.4f) registered as %s%s", best.number, best.val_dice, version["version"],
                " and made current" if job.promote else
                f"; not made current (cellseg models promote --registry {redact_url(job.registry_url)} "
                f"{version['version']} does)")
    create_markdown_artifact(
        key="tune-unet-summary",
        markdown=(
            f"## tune-unet: best trial {best.number}, model {version['version']}\n\n"
            f"Dataset `{dataset['manifest_hash'][:12]}` ({dataset['pairs']} pairs); {len(results)} trials of "
            f"{job.space.size()} grid points; validation Dice {best.val_dice:.4f}.\n\n"
            + markdown_table(rows, TABLE_COLUMNS)
        ),
        description="tune-unet: the registered trial and all trials",
    )
    return {"version": version["version"], "best": best.model_dump(mode="json"), "trials": rows}
