"""The commands that run Prefect flows and deployments (the `orchestration` extra): flow
train-unet, flow segment-images, tune and serve."""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from cellseg.cli_output import INTERRUPTED, batch_status, print_cell_scores, print_metrics, print_preview
from cellseg.cli_parser_base import JOB, given
from cellseg.cli_settings import command_settings
from cellseg.cli_signals import TERMINATED, Terminated
from cellseg.redact import newlines_escaped, redact_url

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from cellseg.job_config import TuneJob

ORCHESTRATION_EXTRA = "pip install 'cellseg[orchestration]'"
TEMPORARY_SERVER_START_SECONDS = 120


def _needs_orchestration(command: str) -> None:
    """A one-line error naming the extra to install when Prefect (or Dask's runner) is missing.
    Also keeps the Prefect server that a flow command starts for itself (no PREFECT_API_URL) from
    reporting to Prefect's telemetry, unless the environment says otherwise (on a machine without
    internet every run's output showed a Prefect ERROR line for it), and out of Ctrl-C's way
    (`flows.temporary_server`). The library's log lines (the epochs, the model loaded) go to the
    flow runs' logs too, as on a worker (deployments/prefect.yaml), instead of the flows' repeating them.
    That server is given 2 minutes to start, not Prefect's 20 s: its first start makes its database,
    and on a busy 2-core machine that took longer and failed the command (the environment's value wins)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(TEMPORARY_SERVER_START_SECONDS))
    extra = [name.strip() for name in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if name.strip()]
    if "cellseg" not in extra:
        os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = ",".join([*extra, "cellseg"])
    # A line logged outside any flow run (a check before the run) is said on stderr, without
    # Prefect's UserWarning that it could not go to the API.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    try:
        import prefect  # noqa: F401
        import prefect_dask  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(f"`cellseg {command}` runs Prefect flows, but {error.name} is not installed: "
                                  f"{ORCHESTRATION_EXTRA}") from error
    from cellseg.flows.temporary_server import keep_temporary_server_from_ctrl_c

    keep_temporary_server_from_ctrl_c()


def _json_object(text: str, flag: str) -> dict[str, Any]:
    """The JSON object a flag such as --training-json gives; ValueError naming the flag otherwise."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{flag} is not valid JSON ({error}): give a JSON object of fields") from error
    if not isinstance(value, dict):
        raise ValueError(f"{flag} gives {text!r}, not a JSON object of fields")
    return value


def run_flow_train(args: argparse.Namespace) -> int:
    _needs_orchestration("flow train-unet")
    from cellseg.flows.train import train_unet
    from cellseg.jobs import TrainJob, with_settings

    settings = command_settings(args, {"model": _json_object(args.model_json, "--model-json"),
                                "training": _json_object(args.training_json, "--training-json")})
    job = with_settings(TrainJob.model_validate({"images_url": args.images, "masks_url": args.masks, **given(args, JOB)}),
                        settings)
    result = train_unet(job)
    made_current = ("current" if job.promote else f"not current: `cellseg models promote {result['version']} "
                    f"--registry {redact_url(job.registry_url)}` makes it so")
    print(f"registered model {result['version']} ({result['stop_reason']}; {result['best_described']}), {made_current}")
    print_metrics({f"val_{k}": v for k, v in result["metrics"].items() if not k.startswith("cells_")})
    if cells := {k.removeprefix("cells_"): v for k, v in result["metrics"].items() if k.startswith("cells_")}:
        print_cell_scores(cells, label=f"validation cells ({cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def run_flow_segment(args: argparse.Namespace) -> int:
    from cellseg.jobs import SegmentJob, with_settings

    job = with_settings(SegmentJob.model_validate({"source_url": args.source, "store_url": args.store,
                                                   **given(args, JOB)}), command_settings(args))
    if args.dry_run:  # the library's plan alone: no Prefect
        from cellseg.jobs_plan import preview_segmentation

        return print_preview(preview_segmentation(job), args.source, args.store)
    _needs_orchestration("flow segment-images")
    from cellseg.flows.segment import segment_images_flow
    from cellseg.segment import cpu_line

    _warn_when_dask_workers_cannot_report(job.dask_address)
    summary = segment_images_flow(job)
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {len(summary['failed'])} "
          f"with model {summary['model_version']} in {summary['seconds']}s -> {redact_url(args.store)}")
    if summary.get("cpu_ms_per_image"):
        print(f"  CPU per image: {cpu_line(summary['cpu_ms_per_image'])}")
    if summary.get("montage"):
        print(f"montage: {redact_url(summary['montage'])}")
    for failure in summary["failed"]:
        print(newlines_escaped(f"  failed: {failure['source_url']}: {failure['error']}"))
    for warning in summary["warnings"]:
        print(newlines_escaped(f"  warning: {warning['source_url']}: {warning['warning']}"))
    return batch_status(len(summary["failed"]))


def _warn_when_dask_workers_cannot_report(dask_address: str | None) -> None:
    """Without PREFECT_API_URL a flow command runs on a temporary Prefect server of its own, which
    Dask workers do not report to: each starts one of its own, so the run finishes (results come
    back through Dask) but the tasks' states and logs never reach it."""
    from prefect.settings import PREFECT_API_URL

    if dask_address and not PREFECT_API_URL.value():
        logging.getLogger("cellseg").warning(
            "--dask-address without PREFECT_API_URL: the Dask workers cannot report to the temporary Prefect "
            "server of this command, so the tasks' progress and logs stay on the workers (the results still come "
            "back); set PREFECT_API_URL here and on the workers to a server all of them reach (infra/README.md)")


def run_tune(args: argparse.Namespace) -> int:
    _needs_orchestration("tune")
    from cellseg.flows.temporary_server import shared_temporary_server
    from cellseg.flows.tune import tune_unet
    from cellseg.jobs import TuneJob, with_settings
    from cellseg.tune import NoTrialFinished, trial_rows

    fields = given(args, JOB)
    fields["training"] = _json_object(args.training_json, "--training-json") | fields.get("training", {})
    job = with_settings(TuneJob.model_validate({"images_url": args.images, "masks_url": args.masks, **fields}),
                        command_settings(args))
    _warn_when_dask_workers_cannot_report(job.dask_address)
    before = set(os.listdir(job.work_dir)) if os.path.isdir(job.work_dir) else set()
    processes = multiprocessing.active_children()  # not trials
    try:
        # The trials' processes on this machine report to it; a Dask worker elsewhere could not reach it.
        with shared_temporary_server() if job.dask_address is None else nullcontext():
            result = tune_unet(job)
    except NoTrialFinished as error:
        _print_trials(trial_rows(error.results), job)  # the table first: `main` ends with the error's line
        raise
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (cli_signals.Terminated)
        _stop_trial_processes(spared=processes)
        left = sorted(set(os.listdir(job.work_dir)) - before) if os.path.isdir(job.work_dir) else []
        where = (f"the trials' folders so far are left in {', '.join(os.path.join(job.work_dir, name) for name in left)}"
                 if left else "no trial had written anything")
        terminated = isinstance(error, Terminated)
        print(f"cellseg tune: {'stopped by SIGTERM' if terminated else 'interrupted'}; nothing was registered, and "
              f"{where}; run the same command again to search anew", file=sys.stderr)
        return TERMINATED if terminated else INTERRUPTED
    _print_trials(result["trials"], job)
    best, registry = result["best"], redact_url(job.registry_url)
    params = ", ".join(f"{name} {value}" for name, value in best["params"].items())
    current = (" and made current" if job.promote
               else f"; not made current (cellseg models promote --registry {registry} {result['version']} does)")
    print(f"best: trial {best['number']} (val Dice {best['val_dice']:.4f}; {params}), registered as "
          f"{result['version']} in {registry}{current}")
    return 0


def _stop_trial_processes(spared: Sequence[BaseProcess]) -> None:
    """End any trial process still alive after Ctrl-C. tune-unet ends its trials itself when it is
    stopped (`cellseg.jobs_tune.stop_trial_processes`, for a cancel or SIGTERM too); a Ctrl-C that
    lands outside its wait for them, in Prefect's own code, leaves that to this."""
    from cellseg.jobs_tune import stop_trial_processes

    stop_trial_processes(spared=spared)


def _print_trials(rows: Sequence[dict[str, Any]], job: TuneJob) -> None:
    """The table of a search's trials, best first, and a line saying how many ran of those asked for."""
    from cellseg.tune import TABLE_COLUMNS

    columns = [c for c in TABLE_COLUMNS if c != "status"]
    print("  ".join(f"{c:>13}" for c in columns) + "  status")
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("  ".join(f"{cell:>13}" for cell in cells) + f"  {row['status']}")
    failed = sum(row["status"] != "done" for row in rows)
    grid = job.space.size()
    asked = (f", of {job.trials} asked for: the search grid has only {grid} point{'s' if grid != 1 else ''}"
             if len(rows) < job.trials else f" of a {grid}-point search grid")
    print(f"{len(rows)} trial{'s' if len(rows) != 1 else ''} ran{asked}; {len(rows) - failed} done, {failed} failed")


def run_serve(args: argparse.Namespace) -> int:
    _needs_orchestration("serve")
    from cellseg.deployments.serve import serve_all

    command_settings(args)
    serve_all(nightly_source=args.nightly_source, nightly_store=args.nightly_store, cron=args.cron,
              nightly_model_version=args.nightly_model_version)
    return 0
