"""segment-images: list new images, split them into shards, segment the shards in parallel into
one zarr store, and report a summary. Used by the nightly-segmentation and backfill deployments.

Each task is one step of `cellseg.jobs.run_segmentation`: pin the model, plan the shards,
segment a shard; an image too large to read whole is segmented block by block by the steps of
`cellseg.large_image.LargeImage` (prepare, one task per block, stitch, one task per block, finish). The
flow adds parallelism, retries, GPU slots and artifacts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectConcurrentFuture, PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic.json_schema import SkipJsonSchema

from cellseg.flows._common import (
    STOPPED,
    ProgressArtifact,
    configure_storage,
    failing_in_one_line,
    gpu_slot,
    how_stopped,
    job_from_variable,
    markdown_table,
    retry_unless_bad_input,
    stop_with_worker,
    task_runner,
    warn_now,
    with_run_tags,
    worker_job,
)
from cellseg.flows.dask_checks import check_dask_workers, lost_scheduler_error
from cellseg.flows.dask_stop import ClusterStop, shards_on_cluster_stopped_when_left_by_an_error
from cellseg.jobs import SegmentJob
from cellseg.jobs_plan import SegmentPlan, Shard, model_source, pin_model, plan_segmentation
from cellseg.jobs_shards import (
    STOP_GRACE,
    forget_stop_event,
    segment_shard,
    stop_event,
    stopped_when_left_by_an_error,
)
from cellseg.large_image import LargeImage, with_block_threads
from cellseg.pictures import picture_markdown
from cellseg.redact import redact_url
from cellseg.report import montage_url, store_montage
from cellseg.runtime import resolve_device
from cellseg.segment import CPU_STAGES, SegmentReport, StoppedWriting, cpu_line, cpu_ms_per_image
from cellseg.store import ResultStore
from cellseg.waiting import as_completed_awake

PARTLY_FAILED_STATE = "Completed with failures"  # the final state's name when some images failed
RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 10, 30], "retry_condition_fn": retry_unless_bad_input}


@task(name="resolve-model", **RETRIES)
def resolve_model(job: SegmentJob) -> SegmentJob:
    """The job with its model version fixed at the start, so a promotion mid-run changes nothing.
    'bundled' names the model shipped in the package and needs no registry."""
    return pin_model(job)


@task(name="plan-shards", **RETRIES)
def plan_shards(job: SegmentJob) -> SegmentPlan:
    """Images not yet done in the store, in shards of at most `job.shard_size` (id, url) pairs."""
    return plan_segmentation(job)


@task(name="segment-shard", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def segment_one_shard(shard: Shard, job: SegmentJob, stop_key: str = "") -> dict[str, Any]:
    """Segment one shard; the model is loaded once per worker process and reused across shards.
    Images done by an earlier attempt are skipped; bad images are recorded and the shard goes on.
    `stop_key` names the stop of the shards' run (`segment_shards`)."""
    configure_storage()
    with gpu_slot(resolve_device(job.predict.device).type == "cuda"):
        # In this process the run's threading.Event; on a Dask worker the run's event on the scheduler
        stop = stop_event(stop_key) or (ClusterStop(stop_key) if job.dask_address and stop_key else None)
        report = segment_shard(job, shard, beside_others=True, stop=stop)
    return _shard_result(report)


@task(name="prepare-blocks", **RETRIES)
def prepare_blocks(job: SegmentJob, image_id: str, url: str) -> tuple[int, list[int]]:
    """Plan a large image's blocks, or take up an earlier run's: (blocks, those still to predict)."""
    configure_storage()
    return LargeImage(job, image_id, url).prepare()


@task(name="predict-block", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def predict_one_block(index: int, job: SegmentJob, image_id: str, url: str) -> str:
    """Predict one block of a large image and write its core (the model loaded once per worker)."""
    configure_storage()
    with gpu_slot(resolve_device(job.predict.device).type == "cuda"):
        return LargeImage(job, image_id, url).predict(index)


@task(name="stitch-blocks", **RETRIES)
def stitch_blocks(job: SegmentJob, image_id: str, url: str) -> None:
    """Join the cells that cross block seams and number every cell of a large image."""
    configure_storage()
    LargeImage(job, image_id, url).stitch()


@task(name="measure-block", **RETRIES)
def measure_one_block(index: int, job: SegmentJob, image_id: str, url: str) -> str:
    """Write one block's final labels and measure the cells it owns."""
    configure_storage()
    return LargeImage(job, image_id, url).measure(index)


@task(name="finish-blocks", **RETRIES)
def finish_blocks(job: SegmentJob, image_id: str, url: str, started: float) -> dict[str, Any]:
    """The cell table, statistics, pyramid and done mark of a large image; its summary as a shard's."""
    configure_storage()
    return _shard_result(LargeImage(job, image_id, url).finish(started))


@flow(name="segment-large-image")
def segment_large_image(job: SegmentJob, image_id: str, url: str, gpu: bool = False) -> dict[str, Any]:
    """Segment one image block by block on this flow's task runner (threads, or Dask): its blocks
    are predicted in parallel, stitched once, measured in parallel, then finished, with a live
    progress artifact (`segment-large-image-progress`, per block of each step). A step that
    fails after its retries records the image as failed (its finished blocks are kept, so the
    next run redoes only the others) and the run goes on."""
    started = time.monotonic()
    large = LargeImage(job, image_id, url)
    try:
        try:
            return _block_steps(job, image_id, url, gpu, started)
        except Exception as error:
            if not large.start_over_after(error):  # a damaged scratch, removed: once more from the start
                raise
            return _block_steps(job, image_id, url, gpu, started)
    except Exception as error:  # noqa: BLE001 - the image is recorded as failed, the run goes on
        return _shard_result(large.fail(error))


def _block_steps(job: SegmentJob, image_id: str, url: str, gpu: bool, started: float) -> dict[str, Any]:
    predict_task = predict_one_block.with_options(tags=["gpu"]) if gpu else predict_one_block
    blocks, todo = prepare_blocks(job, image_id, url)
    if not blocks:  # finished by another run meanwhile
        return _shard_result(LargeImage(job, image_id, url).finish())
    steps = len(todo) + blocks
    progress = ProgressArtifact("segment-large-image-progress", steps,
                                f"{image_id}: {blocks} blocks, {len(todo)} to predict")
    _each_block(predict_task.map(todo, unmapped(job), unmapped(image_id), unmapped(url)),
                lambda done: progress.update(done, f"{image_id}: {done} of {len(todo)} blocks predicted"))
    stitch_blocks(job, image_id, url)
    _each_block(measure_one_block.map(range(blocks), unmapped(job), unmapped(image_id), unmapped(url)),
                lambda done: progress.update(len(todo) + done,
                                             f"{image_id}: {len(todo)} blocks predicted, {done} of {blocks} measured"))
    return finish_blocks(job, image_id, url, started)


def _each_block(futures: list[PrefectFuture[str]], on_done: Callable[[int], None]) -> None:
    """Wait for one step's block tasks, `on_done` told of each; where one fails, those not started
    on this process's threads never start (on Dask they run), and all end before its error is
    raised, so none writes into a scratch that a start over replaces."""
    try:
        for done, future in enumerate(as_completed_awake(futures), start=1):
            future.result()
            on_done(done)
    except Exception:
        _start_no_more(futures)
        for _ in as_completed_awake(futures):
            pass
        raise


def _shard_result(report: SegmentReport) -> dict[str, Any]:
    return {"done": len(report.done), "skipped": len(report.skipped), "failed": report.failed,
            "warnings": report.warnings, "seconds": report.seconds, "pixels": report.pixels,
            "cpu_seconds": report.cpu_seconds, "cpu_images": report.cpu_images}


@task(name="draw-montage")
def draw_montage(store_url: str, images: Shard, run_name: str) -> str | None:
    """A few of this run's segmented images with their cell outlines, saved beside the store and
    embedded in the `segment-images-montage` artifact (a link to the file would not open in the UI)."""
    montage = store_montage(ResultStore.open(store_url, mode="r"), images, montage_url(store_url, run_name))
    if montage:
        title = f"Segmented images in {redact_url(store_url)}"
        create_markdown_artifact(
            key="segment-images-montage",
            markdown=f"### {title}\n\n{picture_markdown(montage, title)}\n\nSaved as `{redact_url(montage)}`.",
            description=f"{title}, with their cell outlines",
        )
    return montage


def segment_shards(shards: list[Shard], job: SegmentJob, runner: TaskRunner, gpu: bool = False,
                   on_first_shard: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Run one segment-shard task per shard on `runner` (threads, or Dask), as tasks of the calling
    flow run, with a live progress artifact; `on_first_shard` is called once, when the first shard
    finishes (segment-images draws its montage then, beside the shards still running).

    Not an inner flow run: each flow run's end waits for its heartbeat thread, which sleeps in
    one-second steps (Prefect 3.9), so an inner flow cost every run about a second more
    (docs/performance.md, "Prefect's share of a run"). On a GPU each shard holds a slot of the `gpu`
    global concurrency limit when one exists (and the tasks carry the `gpu` tag, for tag-based
    task concurrency limits).
    """
    shard_task = segment_one_shard.with_options(tags=["gpu"]) if gpu else segment_one_shard
    images = sum(len(shard) for shard in shards)
    # Interrupted (Ctrl-C, a cancellation), the shards in this process's threads end after writing
    # what they have predicted, before the runner waits for them; those on Dask workers likewise,
    # within a second or so, told through the scheduler.
    # One key per call: a flow run retried on the same Dask scheduler keeps its id, and must not
    # find the stop its earlier attempt left set there.
    key = f"{flow_run.get_id()}-{uuid.uuid4().hex[:12]}"
    try:
        with runner:
            futures: list[PrefectFuture[Any]] = []
            try:
                with stopped_when_left_by_an_error(key), \
                        shards_on_cluster_stopped_when_left_by_an_error(job.dask_address, key):
                    futures = list(runner.map(shard_task, {"shard": shards, "job": unmapped(job),
                                                           "stop_key": unmapped(key)}))
                    _follow(futures, {future.task_run_id: len(shard) for future, shard in zip(futures, shards,
                                                                                                strict=True)},
                            images, on_first_shard)
            except BaseException:
                _let_running_shards_end(futures)
                raise
            results: list[dict[str, Any]] = []  # read before the runner closes: a Dask client's futures end with it
            stopped: list[StoppedWriting] = []
            for future in futures:
                try:
                    results.append(future.result())
                except StoppedWriting as error:  # the others went on until they too could not write, or finished
                    stopped.append(error)
            if stopped:  # counted over the run, as `cellseg predict` counts them
                raise StoppedWriting.over_run(stopped, sum(result["done"] for result in results), images)
            return results
    finally:  # the runner has waited for its threads: no shard of this run can look its event up now
        forget_stop_event(key)


def _let_running_shards_end(futures: Sequence[PrefectFuture[Any]]) -> None:
    """On a stop: the shards not started on this process's threads never start, and those running,
    told to stop, end after writing what they have predicted, before the runner exits. The
    runner's own exit cancels every task run it holds, and one caught starting logged "Crash
    detected! ... Task run cancelled by the task runner" at ERROR level for a plain cancel."""
    concurrent.futures.wait(_start_no_more(futures), timeout=STOP_GRACE)


def _start_no_more(futures: Sequence[PrefectFuture[Any]]) -> list[concurrent.futures.Future[Any]]:
    """Cancel the task runs of `futures` not yet started on this process's threads (those on Dask
    run); the ones running here, which a cancel cannot stop."""
    local = [future.wrapped_future for future in futures if isinstance(future, PrefectConcurrentFuture)]
    return [future for future in local if not future.cancel()]


def _follow(futures: Sequence[PrefectFuture[Any]], shard_sizes: dict[Any, int], images: int,
            on_first_shard: Callable[[], None] | None) -> None:
    """Wait for the shards, with a live progress artifact; `on_first_shard` when the first is done."""
    progress = ProgressArtifact("segment-images-progress", images, f"segmenting {images} images in {len(futures)} shards")
    finished = 0
    for shard_done, future in enumerate(as_completed_awake(futures), start=1):
        finished += shard_sizes[future.task_run_id]
        progress.update(finished, f"{shard_done} of {len(futures)} shards finished ({finished} of {images} images)")
        if shard_done == 1 and on_first_shard is not None:
            on_first_shard()


# SkipJsonSchema: the parameter schema names SegmentJob alone, not "SegmentJob or null", so a
# misspelt field is refused as "'stor_url' was unexpected", not "not valid under any of the given schemas".
@flow(name="segment-images")
def segment_images_flow(job: SegmentJob | SkipJsonSchema[None] = None, job_variable: str | None = None) -> dict[str, Any]:
    """Segment the images under `job.source_url` that `job.store_url` does not hold yet.

    The job is given (`job`), or read when the run starts from the Prefect variable named by
    `job_variable` (the nightly deployment's `cellseg_nightly`); fields it leaves unset come from
    the worker's settings (CELLSEG_CONFIG file, CELLSEG_* environment). Shards run in parallel on
    a thread pool (`max_parallel_shards`, the CPU cores split between them), or on the Dask
    cluster at `dask_address`. Storage credentials come from the worker's environment and
    settings, never from parameters. When any image failed, the run ends in a
    Completed state named "Completed with failures" whose message counts them (the CLI exits with
    status 3); its result is the summary either way. A fault that stops the run (storage that
    cannot be reached, a model that cannot be loaded) fails it with that one line, as its message
    and summary.
    """
    stop_with_worker()
    return failing_in_one_line("segment-images", "segment-images-summary", _segment_images, job, job_variable)


def _segment_images(job: SegmentJob | None, job_variable: str | None) -> dict[str, Any]:
    example = "prefect deployment run 'segment-images/backfill' --param job='{\"source_url\": ..., \"store_url\": ...}'"
    if job is not None and job_variable is not None:
        raise ValueError(f"segment-images takes a job or job_variable, not both: this run reads its job from the Prefect "
                         f"variable '{job_variable}' (the nightly deployment's); segment other images with {example}")
    if job is None and job_variable is None:
        raise ValueError(f"segment-images needs a job, the images to segment and the store: {example} (or job_variable, "
                         "the name of a Prefect variable holding one)")
    job = worker_job(job if job is not None else job_from_variable(cast(str, job_variable), SegmentJob))
    logger = get_run_logger()
    logger.info("segmenting new images under %s into %s%s", redact_url(job.source_url), redact_url(job.store_url),
                f" (the job the Prefect variable '{job_variable}' holds)" if job_variable else "")
    started = time.monotonic()
    job = resolve_model(job)
    model_version = model_source(job).recorded_version()  # as the images record it: never 'bundled'
    plan = plan_shards(job)
    logger.info("%d images to segment in %d shards with model %s; %d already done",
                plan.pending, len(plan.shards), model_version, len(plan.skipped))
    logger.info("predict settings: %s", predict_settings_line(job))
    for rejected in plan.rejected:
        logger.warning("cannot segment '%s': %s", rejected["source_url"], rejected["error"])
    if job.dask_address and (plan.shards or plan.large):
        check_dask_workers(job.dask_address, {"source_url": job.source_url, "store_url": _existing(job.store_url)})
    results: list[dict[str, Any]] = []
    gpu = resolve_device(job.predict.device).type == "cuda"

    def runner() -> Any:
        return task_runner(job.dask_address, ThreadPoolTaskRunner(max_workers=job.max_parallel_shards))

    run_name = flow_run.get_name() or time.strftime("%Y%m%d-%H%M%S")
    planned = [pair for shard in plan.shards for pair in shard]
    # Drawn once the first shard is done, beside the others: the UI shows it early in a long run,
    # and it no longer adds its time to the run's end.
    early_montage: list[PrefectFuture[str | None]] = []

    def start_montage() -> None:
        early_montage.append(draw_montage.submit(job.store_url, planned, run_name))

    try:
        if plan.shards:
            with with_run_tags():
                try:
                    results = segment_shards(plan.shards, job, runner(), gpu=gpu, on_first_shard=start_montage)
                except Exception as error:
                    lost = lost_scheduler_error(error, job.dask_address)
                    if lost is None:
                        raise
                    raise lost from None
        for image_id, url in plan.large:  # one image at a time, its blocks in parallel
            logger.info("segmenting '%s' block by block", redact_url(url))
            with with_run_tags():
                results.append(segment_large_image.with_options(task_runner=runner())(
                    with_block_threads(job), image_id, url, gpu=gpu))
    except STOPPED as stopped:
        warn_now(logger, "segment-images %s: %s", how_stopped(stopped), kept_line(job, plan))
        raise
    if not (plan.shards or plan.large or plan.skipped or plan.rejected):
        # A misspelt folder that exists and is empty, or a day without images: said, not hidden at INFO.
        logger.warning("nothing to do: no images found under %s", redact_url(job.source_url))
    elif not (plan.shards or plan.large):
        logger.info("nothing to do: no new images under %s", redact_url(job.source_url))

    summary = _summarise(results, plan, time.monotonic() - started, model_version)
    montage = early_montage[0].result() if early_montage else None
    if summary["done"]:
        if montage is None:  # the first shard segmented nothing: drawn from what the run did in the end
            montage = draw_montage(job.store_url, planned, run_name)
        summary["montage"] = redact_url(montage) if montage else montage  # the result and artifacts keep no credentials
    _publish_summary(summary, job)
    if summary["failed"]:
        # The run did its work, but not all of it: a state of type Completed (its result kept, so
        # callers get the summary) named for that, as `cellseg predict` exits with status 3.
        return cast("dict[str, Any]", Completed(name=PARTLY_FAILED_STATE, message=failed_line(summary), data=summary))
    return summary


def kept_line(job: SegmentJob, plan: SegmentPlan) -> str:
    """What a run stopped before its end kept: its images done, read back from the store (each
    counts once its mask, labels and statistics are written), and what a rerun does."""
    planned = [image_id for shard in plan.shards for image_id, _ in shard] + [image_id for image_id, _ in plan.large]
    try:
        done = len(ResultStore.open(job.store_url, mode="r").done_among(planned))
    except Exception as error:  # noqa: BLE001 - the run is ending: said, not raised
        return (f"could not count the images it finished in {redact_url(job.store_url)} ({type(error).__name__}); "
                "those done are kept, and a rerun of the same job segments the others")
    return (f"{done} of its {len(planned)} images were segmented and are kept in {redact_url(job.store_url)} (an "
            f"image half done is not marked done); a rerun of the same job skips them and segments the other "
            f"{len(planned) - done}")


def _existing(store_url: str) -> str:
    """The store, or the folder it is to be created in."""
    return store_url if "://" in store_url or os.path.exists(store_url) else os.path.dirname(store_url) or "."


def _summarise(results: list[dict[str, Any]], plan: SegmentPlan, seconds: float, version: str) -> dict[str, Any]:
    done = sum(result["done"] for result in results)
    pixels = sum(result["pixels"] for result in results)
    cpu_seconds = {stage: sum(result.get("cpu_seconds", {}).get(stage, 0.0) for result in results) for stage in CPU_STAGES}
    return {
        "model_version": version,
        "done": done,
        "skipped": len(plan.skipped) + sum(result["skipped"] for result in results),
        "failed": plan.rejected + [failure for result in results for failure in result["failed"]],
        "warnings": [warning for result in results for warning in result["warnings"]],
        "shards": len(plan.shards),
        "seconds": round(seconds, 2),
        "images_per_second": round(done / seconds, 3) if seconds else None,
        "megapixels_per_second": round(pixels / 1e6 / seconds, 3) if seconds else None,
        "cpu_ms_per_image": cpu_ms_per_image(cpu_seconds, sum(result.get("cpu_images", 0) for result in results)),
    }


def failed_line(summary: dict[str, Any]) -> str:
    """What the run's final state and summary say when images failed."""
    failed = len(summary["failed"])
    return (f"{failed} image{'s' if failed > 1 else ''} failed ({summary['done']} done, {summary['skipped']} skipped): "
            "each is listed in the summary and recorded, and the next run tries them again")


def predict_settings_line(job: SegmentJob) -> str:
    """The run's predict settings on one line, `name=value` in field order, as segment-shard used them."""
    return " ".join(f"{name}={json.dumps(value)}" for name, value in job.predict.model_dump(mode="json").items())


def _publish_summary(summary: dict[str, Any], job: SegmentJob) -> None:
    counts = [{"images": key, "count": summary[key] if key != "failed" else len(summary["failed"])}
              for key in ("done", "skipped", "failed")]
    markdown = (
        f"## segment-images into `{redact_url(job.store_url)}`\n\n"
        f"Model `{summary['model_version']}`, {summary['shards']} shards, {summary['seconds']} s, "
        f"{summary['images_per_second']} images/s, {summary['megapixels_per_second']} megapixels/s."
        + (f" CPU per image: {cpu_line(summary['cpu_ms_per_image'])}." if summary["cpu_ms_per_image"] else "")
        + "\n\n"
        + markdown_table(counts, ("images", "count"))
        + f"\n\nPredict settings (flags, the worker's settings, defaults): `{predict_settings_line(job)}`"
    )
    if summary["failed"]:
        markdown += (f"\n\n### Failed images\n\n**{failed_line(summary)}**\n\n"
                     + markdown_table(summary["failed"], ("source_url", "error")))
    if summary["warnings"]:
        markdown += "\n\n### Warnings (images done)\n\n" + markdown_table(summary["warnings"], ("source_url", "warning"))
    create_markdown_artifact(key="segment-images-summary", markdown=markdown, description="segment-images run summary")
    get_run_logger().info(
        "segmented %d, skipped %d, failed %d, %d warnings in %.1fs%s",
        summary["done"], summary["skipped"], len(summary["failed"]), len(summary["warnings"]), summary["seconds"],
        f"; CPU per image: {cpu_line(summary['cpu_ms_per_image'])}" if summary["cpu_ms_per_image"] else "",
    )
