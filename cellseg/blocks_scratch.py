"""What the steps of one block-wise image (`cellseg.blocks`) share, kept in the store under
`<image id>/blocks`: the plan's settings, each block's progress and slots, the mark of a run's
last step by which another run tells a plan in work from one a stopped run left (`ACTIVE_WAIT`),
the blocks' edge bands; and a damaged scratch: lost chunks found before a rerun takes it up, a
chunk that cannot be decoded found by a step (the image then segmented from the start)."""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import zarr

from cellseg.blocks_levels import Levels
from cellseg.config import NormalizationConfig, PredictConfig
from cellseg.infer import Predictor
from cellseg.json_values import finite_json
from cellseg.measure import CELL_COLUMNS
from cellseg.normalize import histogram_lut
from cellseg.redact import redact_url
from cellseg.stitch import BlockGrid
from cellseg.store import ResultStore
from cellseg.store_blockwise import STATE_COLUMNS, lost_scratch_chunks, read_block_states
from cellseg.store_checks import StoreError, describe
from cellseg.store_layout import CHUNK_ERRORS, METADATA_ERRORS
from cellseg.zarr_writes import UndecodableChunk, read_region, write_region

logger = logging.getLogger("cellseg.blocks")  # block-wise segmentation's one logger, whichever of its modules speaks

SUM_COLUMNS = ("label", "area", "intensity_integrated")  # what is kept of each cell without measure_cells


def table_columns(measure_cells: bool) -> tuple[str, ...]:
    """The columns of the scratch table's rows (`measure_block` writes them, `finish_image` gathers
    them): every CELL_COLUMNS with `measure_cells`, else SUM_COLUMNS."""
    return CELL_COLUMNS if measure_cells else SUM_COLUMNS

# Seconds since a run's last step on an image (a block predicted or measured, the stitch, the
# finish: seconds each, a few minutes for the pyramid of the largest images) after which its plan
# counts as left by a run that stopped without saying so (killed), and another run may replace it.
ACTIVE_WAIT = 300.0
MARK_EVERY = ACTIVE_WAIT / 10  # seconds between one process's marks: a mark costs a write (a PUT on S3)
_marked: dict[tuple[str, str], float] = {}  # (store URL, image id): when this process last marked it (monotonic)


@dataclass
class Scratch:
    """What the steps of one image share, kept in the store under `<image id>/blocks`."""

    store: ResultStore
    image_id: str
    group: zarr.Group
    attrs: dict[str, Any]
    opened: dict[str, zarr.Array] = field(default_factory=dict)  # arrays by path, each opened once per step

    @classmethod
    def open(cls, store: ResultStore, image_id: str) -> Scratch:
        group = store.root.get(f"{image_id}/blocks")
        if not isinstance(group, zarr.Group) or "plan" not in group.attrs:
            raise StoreError(f"image '{image_id}' in '{store.url}' has no block-wise run to continue (prepare it first)")
        return cls(store, image_id, group, dict(group.attrs))

    @property
    def config(self) -> PredictConfig:
        return PredictConfig.model_validate(self.attrs["predict"])

    @property
    def grid(self) -> BlockGrid:
        blocks = self.config.blocks
        height, width = self.attrs["plan"]["shape"]
        return BlockGrid((int(height), int(width)), blocks.block_size, blocks.overlap)

    @property
    def levels(self) -> Levels:
        return Levels(**self.attrs["levels"])

    def lut(self) -> np.ndarray | None:
        histogram = self.group.get("histogram")
        if histogram is None:
            return None
        return histogram_lut(np.asarray(cast("zarr.Array", histogram)[...]), self.config_normalization)

    @property
    def config_normalization(self) -> NormalizationConfig:
        return NormalizationConfig.model_validate(self.attrs["normalization"])

    def array(self, name: str) -> zarr.Array:
        return self._opened(f"{self.image_id}/blocks/{name}", every_chunk=False)

    def image_array(self, path: str) -> zarr.Array:
        return self._opened(f"{self.image_id}/{path}", every_chunk=True)

    def _opened(self, path: str, every_chunk: bool) -> zarr.Array:
        if path not in self.opened:
            self.opened[path] = self.store.region_array(path, every_chunk=every_chunk)
        return self.opened[path]

    def state(self) -> np.ndarray:
        """(blocks, 4) int64: each block's stage, labels in its core, labels in its window, cells it
        measured only in part."""
        return read_block_states(self.array("state"), self.grid, self.config.blocks.max_pixels)

    def block_state(self, index: int) -> np.ndarray:
        return read_region(self.array("state"), (index, 0), (1, STATE_COLUMNS))[0]

    def set_state(self, index: int, stage: int, core_labels: int = 0, labels: int = 0, oversized: int = 0) -> None:
        write_region(self.array("state"), (index, 0), np.array([[stage, core_labels, labels, oversized]], dtype=np.int64))

    def block_slot(self, name: str, index: int) -> np.ndarray:
        """Block `index`'s entry of a scratch array with one chunk per block (`ring`, `edges`)."""
        array = self.array(name)
        return read_region(array, (index, *(0,) * (array.ndim - 1)), (1, *array.shape[1:]))[0]

    def set_block_slot(self, name: str, index: int, values: np.ndarray) -> None:
        write_region(self.array(name), (index, *(0,) * values.ndim), values[None])

    def update(self, **values: Any) -> None:
        """Add `values` to the attributes as they are in the store now, not as this step read them:
        another run taking steps on the same plan may have written since (its stitch record)."""
        group = self.store.root.get(f"{self.image_id}/blocks")
        if not isinstance(group, zarr.Group) or group.attrs.get("plan") != self.attrs["plan"]:
            raise StoreError(f"image '{self.image_id}': its block-wise plan was removed or replaced meanwhile (another "
                             "run finished the image, or planned it with other settings once this run's last step "
                             "had aged out)")
        self.group, self.attrs = group, {**group.attrs, **finite_json(values)}
        group.attrs.put(self.attrs)

    def mark_active(self, stopped: bool = False) -> None:
        """Record that a run takes a step on this image now (at most every MARK_EVERY seconds from
        one process), or (`stopped`) that the run working on it has stopped, so that a run with
        other settings need not wait for it (`ACTIVE_WAIT`). A scratch from a cellseg without the
        mark gets one."""
        key, now = (self.store.url, self.image_id), time.monotonic()
        if not stopped and now - _marked.get(key, -MARK_EVERY) < MARK_EVERY:
            return
        try:
            mark = self.array("active")
        except KeyError:
            mark = blank_mark(self.store, self.image_id)
        write_region(mark, (0,), np.array([0.0 if stopped else time.time()]))
        _marked[key] = -MARK_EVERY if stopped else now

    def still_ours(self, predictor: Predictor) -> None:
        """Refuse to go on where the plan is no longer this run's: another run with other settings
        or another model replaced it after this run's last step had aged out (`ACTIVE_WAIT`)."""
        plan = self.attrs["plan"]
        if {"model": plan["model"], "predict": plan["predict"]} != plan_settings(predictor):
            raise StoreError(f"image '{self.image_id}': its block-wise plan was replaced by another run with other "
                             "settings or another model; the image is left to that run")


def plan_settings(predictor: Predictor) -> dict[str, Any]:
    """What of a run's plan must match for another run to take it up, besides the image."""
    return {"model": predictor.model_version,
            "predict": predictor.config.result_settings()}  # a rerun with other speed settings takes up the blocks


def blank_mark(store: ResultStore, image_id: str) -> zarr.Array:
    return store.blank_array(f"{image_id}/blocks/active", (1,), np.float64, (1,), every_chunk=False,
                             dimension_names=("time",))


def idle_seconds(store: ResultStore, image_id: str) -> float:
    """Seconds since a run last took a step on the image (`Scratch.mark_active`); infinite where
    the run said it stopped, or the scratch has no mark."""
    try:
        mark = store.root[f"{image_id}/blocks/active"]
        at = float(read_region(cast("zarr.Array", mark), (0,), (1,))[0])
    except (KeyError, *METADATA_ERRORS, *CHUNK_ERRORS):  # no mark (an older cellseg's scratch), or a damaged one
        return float("inf")
    return max(0.0, time.time() - at) if at > 0 else float("inf")


def mark_stopped(store: ResultStore, image_id: str) -> None:
    """Say that the run working on the image has stopped (best effort: where the store cannot be
    written, the mark ages out in `ACTIVE_WAIT`)."""
    try:
        Scratch.open(store, image_id).mark_active(stopped=True)
    except Exception:
        logger.debug("could not mark the block-wise run of '%s' stopped", image_id, exc_info=True)


class EdgeReader:
    """Blocks' edge bands (`stitch.pack_edges`) from the scratch, each read once while kept."""

    def __init__(self, scratch: Scratch, cols: int):
        self.scratch, self.cols = scratch, cols
        self.read: dict[int, np.ndarray] = {}

    def __call__(self, block: int) -> np.ndarray:
        if block not in self.read:
            self.read[block] = self.scratch.block_slot("edges", block)
        return self.read[block]

    def forget_rows_above(self, row: int) -> None:
        """Let go of the bands of blocks in rows above `row` (the blocks are taken in raster order)."""
        self.read = {block: bands for block, bands in self.read.items() if block // self.cols >= row}


def scratch_damage(scratch: Scratch) -> list[str]:
    """What makes a plan's scratch unusable for a rerun ([] when nothing): its state unreadable, or a
    chunk its blocks' progress says was written not stored (`stitch.scratch_chunks`), which would
    read as zeros: a block's cells lost, a run failing on it every time. One listing per array."""
    path = f"{scratch.image_id}/blocks"
    try:
        return lost_scratch_chunks(path, scratch.array, scratch.grid, scratch.state(), scratch.attrs.get("stitch"))
    except (KeyError, TypeError, ValueError, *METADATA_ERRORS, *CHUNK_ERRORS) as error:
        return [f"its block-wise scratch '{path}' cannot be read ({describe(error)})"]


def start_over_after(store: ResultStore, image_id: str, url: str, error: BaseException) -> bool:
    """Whether `error` is a chunk of the image's block-wise scratch that cannot be decoded (a torn
    write, a disk error), which would fail every rerun at the same block; if so, the scratch is
    removed, so that the image is segmented from the start."""
    if not (isinstance(error, UndecodableChunk) and error.key.startswith(f"{image_id}/blocks/")):
        return False
    logger.warning("'%s': its block-wise scratch is damaged (%s); segmenting it from the start", redact_url(url), error)
    with suppress(KeyError):  # removed meanwhile by another run that found the same damage
        del store.root[f"{image_id}/blocks"]
    return True
