"""Images bigger than memory, segmented block by block and stitched (docs/store.md, "Images bigger
than memory").

An image above `BlockConfig.above_pixels` is never held whole: not its pixels, not a probability
map, not its labels. Its blocks' cores are whole chunks of the store (`stitch.BlockGrid`); each
block is predicted by the Predictor and its tiling on a window reaching `overlap` pixels past its
core, and writes only its core. The steps, each a task of the segment-images flow
(`segment_blockwise` runs them on a thread pool, without Prefect):

1. `prepare_image`: the plan; one pass over the image for its histogram, so that every block is
   normalised exactly as the whole image would be, and for each block's range, the cheap
   foreground test; for a model at a cell size, the image's cell size measured once; the arrays.
2. `predict_block`, per block: cell labels of its window; writes its core's image copy, mask and
   probabilities, its core's labels under block-local numbers (scratch), the same labels of its
   core's edge bands (the `overlap` pixels inside each side: what its neighbours' rings cover)
   and its labels of the ring around its core. A block whose core has no pixel above
   `empty_level` skips the model and is recorded as empty: no cell can have a part there.
3. `stitch_image`, once: the labels that are one cell across a seam are joined, and every cell
   gets its final label.
4. `measure_block`, per block: the final labels of its core, and the table rows of its cells.
5. `finish_image`, once: the cell table, the statistics, the pyramid (each level half the one
   before), the NGFF metadata and the done mark; the scratch is removed.

Stitching rule: a block keeps the cells of its core under its own numbers; its neighbours label
the ring of pixels around that core (`overlap` wide) from their windows, and keep them in their
cores. A label of the block's view of the ring and a label written there by a neighbour are one
cell when each is the other's largest overlap in the ring and their intersection over union
there is at least 0.5 (`stitch.seam_pairs`); joined by union-find, a cell crossing a seam or a
corner becomes one label. Cells are numbered 1..N in the order of the first block (raster order)
holding part of them, and that block measures them, on its window: whole when a cell is at most
`overlap` pixels from its core (wider ones are counted in the record, `blocks.oversized`).

Store rule: two tasks never write the same chunk. A block task writes only whole chunks of its
core, and only its own chunk of each scratch array (its row of `state`, its ring, its edge
bands, its rows of the scratch table); `stitch_image` and `finish_image` run once per image,
after every block task of the step before, and write only what no block task writes. Progress is
recorded per block (`state`), so a rerun redoes only unfinished blocks; the image is done only
after step 5. The one chunk every step writes is `active`, the time of a run's last step (each
write replaces it whole), by which a run with other settings tells a plan in work from one a
stopped run left (`ACTIVE_WAIT`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import zarr
from numba import njit
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg.config import NormalizationConfig, PredictConfig
from cellseg.formats import Plane, cell_diameter_pixels, is_microscopy_url, open_plane, source_record, with_area_um2
from cellseg.infer import Predictor
from cellseg.io import StorageOptions
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.normalize import FLAT_RELATIVE_RANGE, histogram_lut, integer_histogram, intensity_skewness
from cellseg.postprocess import CellMaps, cell_labels
from cellseg.redact import redact_url
from cellseg.scale import prediction_factor
from cellseg.stats import label_areas
from cellseg.stitch import (
    EMPTY,
    FINAL_CHUNK,
    MEASURED,
    PREDICTED,
    SCRATCH_LAYOUT,
    TODO,
    BlockGrid,
    Box,
    halve,
    join_labels,
    numbered_across_blocks,
    pack_edges,
    pack_ring,
    pyramid_shapes,
    seam_pairs,
    unpack_ring,
    written_labels,
)
from cellseg.store import ResultStore
from cellseg.store_blockwise import lost_scratch_chunks
from cellseg.store_checks import StoreError, describe
from cellseg.store_layout import (
    CELL_TABLE,
    CELLS_PATH,
    CHUNK_ERRORS,
    CHUNK_SIDE,
    IMAGE_PATH,
    MASK_PATH,
    METADATA_ERRORS,
    PROBABILITIES_PATH,
    TABLE_CHUNK_ROWS,
)
from cellseg.store_writes import recorded_source
from cellseg.zarr_writes import UndecodableChunk, read_region, write_region

logger = logging.getLogger(__name__)

SAMPLE_PIXELS = 1 << 24  # pixels sampled for the percentiles of images without a histogram (not 8/16-bit)
SUM_COLUMNS = ("label", "area", "intensity_integrated")  # what is kept of each cell without measure_cells


class Source(Protocol):
    """A 2-D image read region by region: a zarr array, tifffile's zarr view, `formats.Plane`."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: tuple[slice, slice]) -> Any: ...


SourceOpener = Callable[[], Source]


def region(source: Source, box: Box) -> np.ndarray:
    """The pixels of `box` of `source`, as numpy."""
    return np.asarray(source[box[0]:box[1], box[2]:box[3]])


def blockwise_shape(url: str, config: PredictConfig, storage_options: StorageOptions = None) -> tuple[int, int] | None:
    """The (H, W) of an image to segment block by block: one read region by region (TIFF, OME-Zarr,
    CZI/ND2/LIF) with more than `config.blocks.above_pixels` pixels; None for any other (PNG and
    JPEG are decoded whole anyway) and for a file that cannot be opened (reading it says why)."""
    if not (is_microscopy_url(url) or url.split("#", maxsplit=1)[0].lower().endswith((".tif", ".tiff"))):
        return None
    try:
        with open_plane(url, config.selection, storage_options) as plane:
            height, width = plane.shape
    except Exception:  # noqa: BLE001 - the whole-image path records why it cannot be read
        return None
    return (height, width) if height * width > config.blocks.above_pixels else None


# The image's levels -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Levels:
    """How an image read block by block is normalised, and each block's intensity range: from one
    pass over it (`image_levels`). 8- and 16-bit images keep their histogram (scratch
    `histogram`), whose table (`histogram_lut`) normalises exactly as `normalize_image` does the
    whole image; others use percentiles of a regular sample of SAMPLE_PIXELS pixels."""

    dtype: str
    low: float
    high: float
    invert: bool
    flat: bool
    block_min: list[float]
    block_max: list[float]
    block_sum: list[float]

    def normalise(self, values: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
        """float32 in [0, 1] for raw `values`; `lut` is the histogram's table (None: percentiles)."""
        if self.flat:
            return np.zeros(values.shape, dtype=np.float32)
        if lut is not None:
            return lut[values]
        low, high = np.float64(self.low), np.float64(self.high)
        scaled = np.clip((values.astype(np.float32, copy=False) - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return 1.0 - scaled if self.invert else scaled

    def brightest(self, blocks: Sequence[int], lut: np.ndarray | None) -> float:
        """The highest normalised intensity in the cores of `blocks` (the foreground test)."""
        extremes = np.array([min(self.block_min[b] for b in blocks), max(self.block_max[b] for b in blocks)])
        return float(self.normalise(extremes.astype(self.dtype), lut).max())


def image_levels(source: Source, grid: BlockGrid, config: NormalizationConfig, workers: int = 1
                 ) -> tuple[Levels, np.ndarray | None]:
    """(Levels, histogram or None) of an image, read one core at a time by `workers` threads."""
    dtype = np.dtype(source.dtype)
    by_histogram = dtype in (np.uint8, np.uint16)
    stride = max(1, int(np.ceil(np.sqrt(grid.shape[0] * grid.shape[1] / SAMPLE_PIXELS))))

    def scan(index: int) -> tuple[float, float, float, np.ndarray]:
        core = grid.core(index)
        pixels = region(source, core)
        if dtype.kind == "f" and not np.isfinite(pixels).all():
            raise ValueError(f"pixels in rows {core[0]}-{core[1]}, columns {core[2]}-{core[3]} are NaN or infinite; "
                             "expected finite intensities")
        part = integer_histogram(pixels) if by_histogram else pixels[(-core[0]) % stride::stride,
                                                                       (-core[2]) % stride::stride].ravel()
        return float(pixels.min()), float(pixels.max()), float(pixels.sum(dtype=np.float64)), part

    minima, maxima, sums, parts = [], [], [], []
    counts = np.zeros(1 << (8 * dtype.itemsize) if by_histogram else 0, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for low, high, total, part in pool.map(scan, range(grid.count)):
            minima.append(low)
            maxima.append(high)
            sums.append(total)
            if by_histogram:
                counts[: len(part)] += part
            else:
                parts.append(part)
    if by_histogram:
        counts = counts[: int(max(maxima)) + 1]  # as np.bincount of the whole image
        lut = histogram_lut(counts, config)
        levels = Levels(dtype.str, 0.0, 1.0, False, lut is None, minima, maxima, sums)
        return levels, counts
    sample = np.concatenate(parts).astype(np.float32)
    low, high = (float(value) for value in np.percentile(sample, [config.low_percentile, config.high_percentile]))
    flat = high - low <= FLAT_RELATIVE_RANGE * max(abs(low), abs(high)) if dtype.kind == "f" else high <= low
    invert = config.polarity == "auto" and intensity_skewness(sample) < 0
    return Levels(dtype.str, low, high, invert, bool(flat), minima, maxima, sums), None


# The steps ----------------------------------------------------------------------------------------


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
        state = self.array("state")
        return read_region(state, (0, 0), state.shape)

    def block_state(self, index: int) -> np.ndarray:
        return read_region(self.array("state"), (index, 0), (1, 4))[0]

    def set_state(self, index: int, stage: int, core_labels: int = 0, labels: int = 0, oversized: int = 0) -> None:
        write_region(self.array("state"), (index, 0), np.array([[stage, core_labels, labels, oversized]], dtype=np.int64))

    def block_slot(self, name: str, index: int) -> np.ndarray:
        """Block `index`'s entry of a scratch array with one chunk per block (`ring`, `edges`)."""
        array = self.array(name)
        return read_region(array, (index, *(0,) * (array.ndim - 1)), (1, *array.shape[1:]))[0]

    def set_block_slot(self, name: str, index: int, values: np.ndarray) -> None:
        write_region(self.array(name), (index, *(0,) * values.ndim), values[None])

    def update(self, **values: Any) -> None:
        self.attrs.update(values)
        self.group.attrs.put(self.attrs)

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
            mark = _blank_mark(self.store, self.image_id)
        write_region(mark, (0,), np.array([0.0 if stopped else time.time()]))
        _marked[key] = -MARK_EVERY if stopped else now

    def still_ours(self, predictor: Predictor) -> None:
        """Refuse to go on where the plan is no longer this run's: another run with other settings
        or another model replaced it after this run's last step had aged out (`ACTIVE_WAIT`)."""
        plan = self.attrs["plan"]
        if {"model": plan["model"], "predict": plan["predict"]} != _settings(predictor):
            raise StoreError(f"image '{self.image_id}': its block-wise plan was replaced by another run with other "
                             "settings or another model; the image is left to that run")


def prepare_image(store: ResultStore, image_id: str, url: str, source: Source, predictor: Predictor,
                  workers: int = 1) -> tuple[int, list[int]]:
    """Plan a block-wise run of one image, or take up the one an earlier run left: (blocks, those
    still to predict). A run left with another plan (other settings, model or image) starts over;
    an image another run has finished meanwhile is left as it is: (0, []).

    Runs that plan the same image at once make one plan (`_claim_plan`): the others take it up, so
    none deletes a block another has written."""
    if store.is_done(image_id):
        return 0, []
    config = predictor.config
    height, width = (int(side) for side in source.shape)
    if height * width > config.blocks.max_pixels:
        raise StoreError(f"'{redact_url(url)}' has {height} x {width} pixels, over the block-wise limit of "
                         f"{config.blocks.max_pixels} (raise predict.blocks.max_pixels to allow it)")
    plan = {"scratch": SCRATCH_LAYOUT, "shape": [height, width], "dtype": np.dtype(source.dtype).str,
            "source_url": redact_url(url), **_settings(predictor)}
    found, group = _planned(store, image_id)
    if group is not None and found == PLANNED:
        if group.attrs["plan"] == plan:
            scratch = Scratch(store, image_id, group, dict(group.attrs))
            if not (damage := scratch_damage(scratch)):
                return _taken_up(scratch)
            logger.warning("'%s': the blocks an earlier run left are damaged (%s); segmenting it from the start",
                           redact_url(url), "; ".join(damage))
            found = DAMAGED
        elif (idle := _idle_seconds(store, image_id)) < ACTIVE_WAIT:
            raise _busy(url, idle)
    if found in (PLANNED, DAMAGED):  # another plan left by a stopped run, or one whose metadata cannot be read
        del store.root[f"{image_id}/blocks"]
    grid = BlockGrid((height, width), config.blocks.block_size, config.blocks.overlap)
    store.root.require_group(image_id).attrs["cellseg"] = {"status": "writing", "source_url": recorded_source(url),
                                                           "blockwise": True}
    normalization = predictor.normalization
    levels, histogram = image_levels(source, grid, normalization, workers)
    lut = histogram_lut(histogram, normalization) if histogram is not None else None
    empty = [index for index in range(grid.count)
             if levels.flat or levels.brightest([index], lut) < config.blocks.empty_level]
    described = source_record(source) if isinstance(source, Plane) else {}
    scale = _image_scale(source, grid, levels, lut, predictor, empty, described, url)
    claim, taken = _claim_plan(store, image_id, plan, url)
    if taken is not None:
        return taken
    try:
        _create_arrays(store, image_id, grid, np.dtype(source.dtype), config, histogram)
        group = store.root.require_group(f"{image_id}/blocks")
        if group.attrs.get("claim") != claim:  # taken for a stopped run's by another run, which plans the image now
            return prepare_image(store, image_id, url, source, predictor, workers)
        _blank_mark(store, image_id)[...] = np.array([time.time()])
        group.attrs.put({"predict": config.model_dump(mode="json"), "normalization": normalization.model_dump(mode="json"),
                         "levels": asdict(levels),
                         "empty": empty, "scale": scale, "source": described, "resumed": 0, "plan": plan})
    except BaseException:  # stopped before the plan was written (Ctrl-C, a failed write): a rerun plans at once
        _withdraw_claim(store, image_id, claim)
        raise
    logger.info("'%s': %d x %d pixels in %d blocks of %d (%d empty)", redact_url(url), height, width, grid.count,
                grid.block, len(empty))
    return grid.count, list(range(grid.count))


NONE, PLANNING, PLANNED, DAMAGED = "none", "planning", "planned", "damaged"  # an image's scratch, as `_planned` finds it
PLAN_WAIT = 120.0  # seconds a plan being written may take (its arrays' metadata) before it counts as left by a stopped run
PLAN_POLL = 0.5  # seconds between looks at a plan another run is writing
# Seconds since a run's last step on an image (a block predicted or measured, the stitch, the
# finish: seconds each, a few minutes for the pyramid of the largest images) after which its plan
# counts as left by a run that stopped without saying so (killed), and another run may replace it.
ACTIVE_WAIT = 300.0
MARK_EVERY = ACTIVE_WAIT / 10  # seconds between one process's marks: a mark costs a write (a PUT on S3)
_marked: dict[tuple[str, str], float] = {}  # (store URL, image id): when this process last marked it (monotonic)


def _settings(predictor: Predictor) -> dict[str, Any]:
    """What of a run's plan must match for another run to take it up, besides the image."""
    return {"model": predictor.model_version,
            "predict": predictor.config.result_settings()}  # a rerun with other speed settings takes up the blocks


def _blank_mark(store: ResultStore, image_id: str) -> zarr.Array:
    return store.blank_array(f"{image_id}/blocks/active", (1,), np.float64, (1,), every_chunk=False,
                             dimension_names=("time",))


def _idle_seconds(store: ResultStore, image_id: str) -> float:
    """Seconds since a run last took a step on the image (`Scratch.mark_active`); infinite where
    the run said it stopped, or the scratch has no mark."""
    try:
        mark = store.root[f"{image_id}/blocks/active"]
        at = float(read_region(cast("zarr.Array", mark), (0,), (1,))[0])
    except (KeyError, *METADATA_ERRORS, *CHUNK_ERRORS):  # no mark (an older cellseg's scratch), or a damaged one
        return float("inf")
    return max(0.0, time.time() - at) if at > 0 else float("inf")


class ImageInUse(StoreError):
    """Another run with other settings or another model is segmenting the image block by block."""


def _busy(url: str, idle: float) -> ImageInUse:
    return ImageInUse(f"'{redact_url(url)}' is being segmented block by block by another run with other settings or "
                      f"another model (its last step {idle:.0f} s ago); run again once it has finished, or, if it was "
                      f"stopped, {ACTIVE_WAIT / 60:.0f} minutes after its last step")


def mark_stopped(store: ResultStore, image_id: str) -> None:
    """Say that the run working on the image has stopped (best effort: where the store cannot be
    written, the mark ages out in `ACTIVE_WAIT`)."""
    try:
        Scratch.open(store, image_id).mark_active(stopped=True)
    except Exception:
        logger.debug("could not mark the block-wise run of '%s' stopped", image_id, exc_info=True)


def _planned(store: ResultStore, image_id: str) -> tuple[str, zarr.Group | None]:
    """(what the image's scratch is, its group where PLANNED or PLANNING: its attributes hold the
    plan, or the claim of the run writing it)."""
    try:
        group = store.root.get(f"{image_id}/blocks")
    except METADATA_ERRORS:
        return DAMAGED, None
    if group is None:
        return NONE, None
    if not isinstance(group, zarr.Group):
        return DAMAGED, None
    return (PLANNED if "plan" in group.attrs else PLANNING), group


def scratch_damage(scratch: Scratch) -> list[str]:
    """What makes a plan's scratch unusable for a rerun ([] when nothing): its state unreadable, or a
    chunk its blocks' progress says was written not stored (`stitch.scratch_chunks`), which would
    read as zeros: a block's cells lost, a run failing on it every time. One listing per array."""
    path = f"{scratch.image_id}/blocks"
    try:
        return lost_scratch_chunks(path, scratch.array, scratch.grid, scratch.state(), scratch.attrs.get("stitch"))
    except (KeyError, TypeError, ValueError, *METADATA_ERRORS, *CHUNK_ERRORS) as error:
        return [f"its block-wise scratch '{path}' cannot be read ({describe(error)})"]


def _taken_up(scratch: Scratch) -> tuple[int, list[int]]:
    scratch.mark_active()
    state = scratch.state()
    scratch.update(resumed=int(np.count_nonzero(state[:, 0] != TODO)))
    return len(state), [int(index) for index in np.flatnonzero(state[:, 0] == TODO)]


def _withdraw_claim(store: ResultStore, image_id: str, claim: dict[str, Any] | None) -> None:
    """Delete the scratch of a plan this run claimed and did not finish, if it still holds the claim."""
    path = f"{image_id}/blocks"
    try:
        attributes = store.root[path].attrs
        if attributes.get("claim") == claim and "plan" not in attributes:
            del store.root[path]
    except Exception:  # the store cannot be read or written: the claim ages out (PLAN_WAIT)
        logger.debug("could not withdraw the block-wise plan claim of '%s'", image_id, exc_info=True)


def _claim_plan(store: ResultStore, image_id: str, plan: dict[str, Any], url: str,
                ) -> tuple[dict[str, Any] | None, tuple[int, list[int]] | None]:
    """Make this run the one that writes the image's plan: (its claim, None), the claim being the
    scratch group created without overwriting, with a token and the time in its attributes. Where
    another run has meanwhile written the same plan, or writes it now, that plan is taken up once
    written: (None, (blocks, those still to predict)). A claim older than PLAN_WAIT, or without a
    token, was left by a run that stopped while planning and is replaced. Another run's plan with
    other settings is left to it: StoreError."""
    path = f"{image_id}/blocks"
    waited_on: Any = None
    while True:
        found, group = _planned(store, image_id)
        if group is not None and found == PLANNED:
            if group.attrs["plan"] == plan:
                return None, _taken_up(Scratch(store, image_id, group, dict(group.attrs)))
            raise _busy(url, _idle_seconds(store, image_id))
        if found == DAMAGED:
            del store.root[path]
            continue
        if found == NONE:
            claim = {"token": uuid.uuid4().hex, "since": time.time()}
            try:
                store.root.create_group(path, overwrite=False, attributes={"claim": claim})
            except (ContainsArrayError, ContainsGroupError):  # another run claimed it just now
                continue
            return claim, None
        held = group.attrs.get("claim") if group is not None else None
        since = held.get("since") if isinstance(held, dict) and isinstance(held.get("token"), str) else None
        if not isinstance(since, float | int) or time.time() - since > PLAN_WAIT:
            if held == waited_on or not isinstance(since, float | int):  # seen twice: nobody is writing it
                del store.root[path]
                waited_on = None
                continue
            waited_on = held
            continue
        if waited_on != held:
            logger.info("'%s': waiting for the block-wise plan another run is writing", redact_url(url))
            waited_on = held
        time.sleep(PLAN_POLL)


def _image_scale(source: Source, grid: BlockGrid, levels: Levels, lut: np.ndarray | None, predictor: Predictor,
                 empty: list[int], described: dict[str, Any], url: str) -> dict[str, Any] | None:
    """For a model at a cell size, the image's cell size, measured once on its brightest block
    (the one with the highest normalised mean) unless given; None for other models."""
    model_diameter = predictor.checkpoint.model_config.cell_diameter
    if not isinstance(model_diameter, float | int):
        return None
    config = predictor.config
    given = config.cell_diameter or cell_diameter_pixels(config.cell_diameter_um, described, url)
    window = grid.window(0)
    if given is not None:
        shape = (window[1] - window[0], window[3] - window[2])
        return {"cell_diameter": given, "measured": False, "factor": prediction_factor(given, float(model_diameter), shape)}
    candidates = [index for index in range(grid.count) if index not in empty]
    if not candidates:
        return {"cell_diameter": None, "measured": True, "factor": 1.0}
    pixels = [(grid.core(b)[1] - grid.core(b)[0]) * (grid.core(b)[3] - grid.core(b)[2]) for b in candidates]
    means = levels.normalise(np.array([levels.block_sum[b] / n for b, n in zip(candidates, pixels, strict=True)]
                                      ).astype(levels.dtype), lut)
    window = grid.window(candidates[int(np.argmax(means))])
    maps = _maps(predictor, levels.normalise(region(source, window), lut), None, window_tile(grid, config))
    return dict(maps.scale or {})


def _create_arrays(store: ResultStore, image_id: str, grid: BlockGrid, dtype: np.dtype, config: PredictConfig,
                   histogram: np.ndarray | None) -> None:
    chunk = min(CHUNK_SIDE, grid.block)
    chunks = (chunk, chunk)
    store.blank_array(f"{image_id}/{MASK_PATH}", grid.shape, np.uint8, chunks)
    store.blank_array(f"{image_id}/{CELLS_PATH}", grid.shape, np.int32, chunks)
    if config.store_image:
        store.blank_array(f"{image_id}/{IMAGE_PATH}", grid.shape, dtype, chunks)
    if config.save_probabilities:
        store.blank_array(f"{image_id}/{PROBABILITIES_PATH}", grid.shape, np.float16, chunks)
    store.blank_array(f"{image_id}/blocks/labels", grid.shape, np.int32, chunks, every_chunk=False)
    for name, slot in (("ring", grid.ring_slot), ("edges", grid.edge_slot)):
        store.blank_array(f"{image_id}/blocks/{name}", (grid.count, *slot), np.int32, (1, *slot), every_chunk=False,
                          dimension_names=("block", "side", "row", "column"))
    store.blank_array(f"{image_id}/blocks/state", (grid.count, 4), np.int64, (1, 4), every_chunk=False,
                      dimension_names=("block", "field"))
    if histogram is not None:
        store.blank_array(f"{image_id}/blocks/histogram", histogram.shape, np.int64, histogram.shape,
                          every_chunk=False, dimension_names=("level",))[...] = histogram


def window_tile(grid: BlockGrid, config: PredictConfig) -> int:
    """The tile side for the blocks' windows: a block whose core fits a tile (`block_size` at most
    `tile_size`) is its own tile, its window predicted in one pass; split further, its overlap
    ring would make four tiles of a window hardly larger than one (2.5 times the passes' pixels
    of a 1024-pixel core's 1152-pixel window, against 1.27)."""
    return grid.block + 2 * grid.overlap if grid.block <= config.tile_size else config.tile_size


def _maps(predictor: Predictor, window: np.ndarray, cell_diameter: float | None, tile: int) -> CellMaps:
    """The Predictor's maps of one normalised window (in tiles of at most `tile`, `tiling.predict_tiled`)."""
    return predictor.normalised_cell_maps([window], [cell_diameter], tile)[0]


def predict_block(store: ResultStore, image_id: str, index: int, source: Source, predictor: Predictor) -> str:
    """Predict one block and write its core; 'predicted', 'empty', or 'done before' (an earlier
    attempt recorded it)."""
    scratch = Scratch.open(store, image_id)
    scratch.still_ours(predictor)
    if scratch.block_state(index)[0] != TODO:
        return "done before"
    scratch.mark_active()
    config, grid = scratch.config, scratch.grid
    core, window = grid.core(index), grid.window(index)
    origin = (core[0], core[2])
    if index in scratch.attrs["empty"]:
        if config.store_image:
            write_region(scratch.image_array(IMAGE_PATH), origin, region(source, core))
        for path in [MASK_PATH, CELLS_PATH] + ([PROBABILITIES_PATH] if config.save_probabilities else []):
            array = scratch.image_array(path)  # scratch labels stay unwritten: zeros
            write_region(array, origin, np.zeros((core[1] - core[0], core[3] - core[2]), dtype=array.dtype))
        scratch.set_state(index, EMPTY)
        return "empty"
    inner = (slice(core[0] - window[0], core[1] - window[0]), slice(core[2] - window[2], core[3] - window[2]))
    pixels = region(source, window)
    scale = scratch.attrs["scale"] or {}
    maps = _maps(predictor, scratch.levels.normalise(pixels, scratch.lut()), scale.get("cell_diameter"),
                 window_tile(grid, config))
    local, core_labels, total = _local_numbers(cell_labels(maps, config), inner)
    if config.store_image:
        write_region(scratch.image_array(IMAGE_PATH), origin, pixels[inner])
    if config.save_probabilities:
        write_region(scratch.image_array(PROBABILITIES_PATH), origin, maps.probability[inner].astype(np.float16))
    write_region(scratch.image_array(MASK_PATH), origin, (local[inner] > 0).astype(np.uint8))
    write_region(scratch.array("labels"), origin, local[inner])
    scratch.set_block_slot("edges", index, pack_edges(grid, index, local[inner]))
    scratch.set_block_slot("ring", index, pack_ring(grid, index, local, window))
    scratch.set_state(index, PREDICTED, core_labels, total)
    return "predicted"


def _local_numbers(labels: np.ndarray, core: tuple[slice, slice]) -> tuple[np.ndarray, int, int]:
    """(labels renumbered, cells in the core, cells in all): those with pixels in the core first,
    1..k, then those only around it, k+1..n."""
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    lookup, in_core, total = _core_first_lookup(labels, core[0].start, core[0].stop, core[1].start, core[1].stop)
    renumbered = np.empty_like(labels)
    _apply_lookup(labels, lookup, renumbered)
    return renumbered, int(in_core), int(total)


@njit(cache=True, nogil=True)
def _core_first_lookup(labels, top, bottom, left, right):  # pragma: no cover - compiled; tested through _local_numbers
    """(lookup from label to its new number, labels with pixels in rows top:bottom and columns
    left:right, labels present), numbering the first ones first, each group in label order."""
    size = labels.max() + 1 if labels.size else 1
    present = np.zeros(size, dtype=np.bool_)
    in_core = np.zeros(size, dtype=np.bool_)
    height, width = labels.shape
    for row in range(height):
        inside_rows = top <= row < bottom
        for col in range(width):
            value = labels[row, col]
            present[value] = True
            if inside_rows and left <= col < right:
                in_core[value] = True
    lookup = np.zeros(size, dtype=np.int32)
    number = 0
    for value in range(1, size):
        if in_core[value]:
            number += 1
            lookup[value] = number
    core_count = number
    for value in range(1, size):
        if present[value] and not in_core[value]:
            number += 1
            lookup[value] = number
    return lookup, core_count, number


@njit(cache=True, nogil=True)
def _apply_lookup(labels, lookup, out):  # pragma: no cover - compiled; tested through _local_numbers
    flat, target = labels.ravel(), out.ravel()
    for index in range(flat.size):
        target[index] = lookup[flat[index]]


def stitch_image(store: ResultStore, image_id: str) -> dict[str, Any]:
    """Join the labels that are one cell across seams and number the cells (the module's rule);
    returns what it recorded: each block's first label, cells owned and label offset."""
    scratch = Scratch.open(store, image_id)
    if "stitch" in scratch.attrs:
        return dict(scratch.attrs["stitch"])
    scratch.mark_active()
    grid, state = scratch.grid, scratch.state()
    if unfinished := [int(index) for index in np.flatnonzero(state[:, 0] == TODO)]:
        raise StoreError(f"image '{image_id}': blocks {unfinished[:10]} are not predicted yet; stitching needs them all")
    core_labels = state[:, 1]
    offsets = np.concatenate([[0], np.cumsum(core_labels)])
    total = int(offsets[-1])
    edges = _EdgeReader(scratch, grid.cols)
    joined = []
    for index in np.flatnonzero(state[:, 0] != EMPTY):
        edges.forget_rows_above(int(index) // grid.cols - 1)
        views, written = [], []
        for box, view in unpack_ring(grid, int(index), scratch.block_slot("ring", int(index))):
            local = written_labels(grid, box, edges)
            views.append(view.ravel())
            written.append(np.where(local > 0, numbered_across_blocks(grid, box, local, offsets), 0).ravel())
        if views:
            pairs = seam_pairs(np.concatenate(views), np.concatenate(written))
            pairs = pairs[pairs[:, 0] <= core_labels[index]]  # labels only around the core have no pixels to join
            joined.append(np.stack([pairs[:, 0] + offsets[index], pairs[:, 1]], axis=1))
    pairs = np.concatenate(joined) if joined else np.zeros((0, 2), dtype=np.int64)
    lookup, first_of_cell = join_labels(total, pairs)
    cells = int(lookup.max(initial=0))
    if cells >= np.iinfo(np.int32).max:
        raise StoreError(f"image '{image_id}' has {cells} cells, more than its int32 labels can number")
    firsts = np.cumsum(first_of_cell)  # cells numbered up to each label
    owned = [int(firsts[offsets[b + 1]] - firsts[offsets[b]]) for b in range(grid.count)]
    starts = [int(firsts[offsets[b]]) + 1 for b in range(grid.count)]
    store.blank_array(f"{image_id}/blocks/final", lookup.shape, np.int64, (min(len(lookup), FINAL_CHUNK),), every_chunk=False,
                      dimension_names=("label",))[...] = lookup
    rows = max([*owned, 1])
    columns = CELL_COLUMNS if scratch.config.measure_cells else SUM_COLUMNS
    store.blank_array(f"{image_id}/blocks/table", (grid.count * rows, len(columns)), np.float64, (rows, len(columns)),
                      every_chunk=False, dimension_names=("cell", "column"))
    record = {"offsets": [int(offset) for offset in offsets], "starts": starts, "owned": owned, "cells": cells,
              "rows": rows, "joined": len(pairs)}
    scratch.update(stitch=record)
    return record


def measure_block(store: ResultStore, image_id: str, index: int, source: Source) -> str:
    """Write the final labels of one block's core and the table rows of the cells it owns; 'measured',
    'empty' or 'done before'."""
    scratch = Scratch.open(store, image_id)
    state = scratch.block_state(index)
    stage = state[0]
    if stage == EMPTY:
        return "empty"
    if stage == MEASURED:
        return "done before"
    scratch.mark_active()
    if "stitch" not in scratch.attrs:
        raise StoreError(f"image '{image_id}' is not stitched yet; its blocks are measured after")
    grid, stitched, config = scratch.grid, scratch.attrs["stitch"], scratch.config
    offsets = stitched["offsets"]
    core, window = grid.core(index), grid.window(index)
    local = _window_labels(scratch, index)
    # Block b's label k is label offsets[b] + k of the stitch's lookup `final`; the neighbourhood's
    # labels are one span of it (its blocks lie in three rows, in raster order).
    neighbourhood = grid.neighbourhood(index)
    first, last = offsets[neighbourhood[0]], offsets[neighbourhood[-1] + 1]
    lookup = read_region(scratch.array("final"), (first,), (last + 1 - first,)).astype(np.int32)  # stitch_image checked the range
    start, count = stitched["starts"][index], stitched["owned"][index]
    parts = list(grid.parts(window))
    boxes = np.array([(top - window[0], bottom - window[0], left - window[2], right - window[2])
                      for _, (top, bottom, left, right) in parts], dtype=np.int64)
    cells, mine = np.empty_like(local), np.empty_like(local)
    if not _final_labels(local, boxes, np.array([offsets[owner] - first for owner, _ in parts], dtype=np.int64),
                         lookup, start, count, cells, mine):
        raise StoreError(f"image '{image_id}', block {index}: its scratch labels reach past the stitched labels; "
                         "delete the image's 'blocks' group to segment it again")
    inner = (slice(core[0] - window[0], core[1] - window[0]), slice(core[2] - window[2], core[3] - window[2]))
    write_region(scratch.image_array(CELLS_PATH), (core[0], core[2]), cells[inner])
    oversized = 0
    if count:
        rows = _cell_rows(mine, region(source, window), config.measure_cells)
        if len(rows) != count:
            raise StoreError(f"image '{image_id}', block {index}: {len(rows)} of its {count} cells found in its window")
        _shift(rows, start - 1, window, config.measure_cells)
        oversized = _cut_at_window_edge(mine, window, grid.shape)
        padded = np.zeros((stitched["rows"], rows.shape[1]))  # the block's whole chunk of rows: no other block writes it
        padded[:count] = rows
        write_region(scratch.array("table"), (index * stitched["rows"], 0), padded)
    scratch.set_state(index, MEASURED, int(state[1]), int(state[2]), oversized)
    return "measured"


@njit(cache=True, nogil=True)
def _final_labels(local, boxes, offsets, lookup, start, count, cells, mine):  # pragma: no cover - compiled; tested through measure_block
    """Into `cells`, each pixel's final label: lookup[its block-local label + its block's offset]
    over each of `boxes` (one per block the window crosses, `offsets` theirs), 0 for background;
    into `mine`, cells start..start+count-1 as 1..count, others 0. False, with nothing more
    written, when a label reaches past `lookup`."""
    for part in range(boxes.shape[0]):
        top, bottom, left, right = boxes[part]
        offset = offsets[part]
        for row in range(top, bottom):
            for col in range(left, right):
                value = local[row, col]
                cell = 0
                if value:
                    position = value + offset
                    if value < 0 or position >= lookup.size:
                        return False
                    cell = lookup[position]
                cells[row, col] = cell
                mine[row, col] = cell - (start - 1) if start <= cell < start + count else 0
    return True


class _EdgeReader:
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


def _window_labels(scratch: Scratch, index: int) -> np.ndarray:
    """The labels that the blocks wrote over block `index`'s window: its core's from the scratch
    labels, the ring's from its neighbours' edge bands (a fraction of their cores' chunks)."""
    grid = scratch.grid
    core, window = grid.core(index), grid.window(index)
    labels = np.zeros((window[1] - window[0], window[3] - window[2]), dtype=np.int32)
    labels[core[0] - window[0]: core[1] - window[0], core[2] - window[2]: core[3] - window[2]] = \
        read_region(scratch.array("labels"), (core[0], core[2]), (core[1] - core[0], core[3] - core[2]))
    edges = _EdgeReader(scratch, grid.cols)
    for top, bottom, left, right in grid.ring(index):
        labels[top - window[0]: bottom - window[0], left - window[2]: right - window[2]] = \
            written_labels(grid, (top, bottom, left, right), edges)
    return labels


def _cell_rows(cells: np.ndarray, image: np.ndarray, measure: bool) -> np.ndarray:
    """The table rows of cells 1..n: every CELL_COLUMNS, or only SUM_COLUMNS."""
    if measure:
        return cell_measurements(cells, image)
    counts = label_areas(cells)
    present = np.flatnonzero(counts[1:]) + 1
    areas = counts[present]
    integrated = np.bincount(cells.ravel(), weights=image.ravel().astype(np.float64))[present]
    return np.stack([present.astype(np.float64), areas.astype(np.float64), integrated], axis=1)


def _shift(rows: np.ndarray, label_offset: int, window: Box, measure: bool) -> None:
    """Rows measured in a window, moved to final labels and image coordinates (in place)."""
    rows[:, 0] += label_offset
    if measure:
        for name, offset in (("centroid_y", window[0]), ("centroid_x", window[2]), ("bbox_min_y", window[0]),
                             ("bbox_min_x", window[2]), ("bbox_max_y", window[0]), ("bbox_max_x", window[2])):
            rows[:, CELL_COLUMNS.index(name)] += offset


def _cut_at_window_edge(cells: np.ndarray, window: Box, shape: tuple[int, int]) -> int:
    """How many cells touch an edge of the window that is not the image's (measured only in part)."""
    edges = [cells[0] if window[0] > 0 else None, cells[-1] if window[1] < shape[0] else None,
             cells[:, 0] if window[2] > 0 else None, cells[:, -1] if window[3] < shape[1] else None]
    touching = np.concatenate([edge for edge in edges if edge is not None] or [np.zeros(0, dtype=np.int32)])
    return len(np.unique(touching[touching > 0]))


def finish_image(store: ResultStore, image_id: str, model: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Write the cell table, the statistics, the pyramid and the done mark of a measured image, and
    remove its scratch; returns its record ({} when another run finished it meanwhile)."""
    scratch = Scratch.open(store, image_id)
    scratch.mark_active()
    state, grid, config, levels = scratch.state(), scratch.grid, scratch.config, scratch.levels
    if unfinished := [int(index) for index in np.flatnonzero(~np.isin(state[:, 0], (EMPTY, MEASURED)))]:
        raise StoreError(f"image '{image_id}': blocks {unfinished[:10]} are not measured yet")
    stitched, described = scratch.attrs["stitch"], scratch.attrs["source"]
    areas, integrated = _write_table(scratch, stitched, config.measure_cells, described)
    pixels = grid.shape[0] * grid.shape[1]
    inside = float(integrated.sum())
    cell_pixels = int(areas.sum())
    statistics = {
        "cell_count": len(areas), "total_cell_area": cell_pixels,
        "mean_cell_area": float(areas.mean()) if len(areas) else None,
        "median_cell_area": float(np.median(areas)) if len(areas) else None,
        "foreground_fraction": cell_pixels / pixels,
        "mean_intensity_inside": inside / cell_pixels if cell_pixels else None,
        "mean_intensity_outside": (sum(levels.block_sum) - inside) / (pixels - cell_pixels) if cell_pixels < pixels else None,
    }
    arrays = [path for path, kept in ((IMAGE_PATH, config.store_image), (MASK_PATH, True), (CELLS_PATH, True),
                                      (PROBABILITIES_PATH, config.save_probabilities), (CELL_TABLE, config.measure_cells))
              if kept]
    shapes = pyramid_shapes(grid.shape, min(CHUNK_SIDE, grid.block))
    _write_pyramids(store, [f"{image_id}/{path}" for path in [IMAGE_PATH, MASK_PATH, CELLS_PATH][0 if config.store_image else 1:]],
                    shapes, average=f"{image_id}/{IMAGE_PATH}", workers=workers)
    oversized = int(state[:, 3].sum())
    warnings = ["image has no contrast: no cells"] if levels.flat else []
    if oversized:
        warnings.append(f"{oversized} cells reach past the block overlap ({grid.overlap} px): measured in part; "
                        "raise predict.blocks.overlap")
    blocks = {"block_size": grid.block, "overlap": grid.overlap, "count": grid.count,
              "empty": len(scratch.attrs["empty"]), "resumed": scratch.attrs["resumed"], "joined": stitched["joined"],
              "oversized": oversized, "levels": len(shapes)}
    record = {"source_url": scratch.attrs["plan"]["source_url"], "shape": list(grid.shape), "model": model, "statistics": statistics,
              "scale": scratch.attrs["scale"], "warnings": warnings, "source": described, "blocks": blocks}
    written = store.write_blockwise_result(image_id, grid.shape, arrays, len(shapes), record)
    del store.root[f"{image_id}/blocks"]
    return record if written else {}


def _write_table(scratch: Scratch, stitched: dict[str, Any], measure: bool, described: dict[str, Any]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Gather the blocks' rows, in label order, into the image's cell table (with `measure`),
    whole chunks of rows at a time; returns every cell's area and integrated intensity."""
    columns = CELL_COLUMNS if measure else SUM_COLUMNS
    cells, stride = stitched["cells"], stitched["rows"]
    target = None
    if measure:
        named = with_area_um2(columns, np.zeros((0, len(columns))), described)[0]
        target = scratch.store.blank_array(
            f"{scratch.image_id}/{CELL_TABLE}", (cells, len(named)), np.float64,
            (max(1, min(cells, TABLE_CHUNK_ROWS)), len(named)), attributes={"columns": list(named)},
            dimension_names=("cell", "column"))
    source = scratch.array("table")
    areas: list[np.ndarray] = []
    integrated: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    written = 0

    def flush(last: bool) -> None:
        nonlocal pending, written
        rows = np.concatenate(pending) if pending else np.zeros((0, len(columns)))
        take = len(rows) if last else len(rows) // TABLE_CHUNK_ROWS * TABLE_CHUNK_ROWS
        if target is not None and take:
            target[written: written + take] = with_area_um2(columns, rows[:take], described)[1]
        written, pending = written + take, [rows[take:]]

    for index, count in enumerate(stitched["owned"]):
        if count:
            rows = read_region(source, (index * stride, 0), (count, len(columns)))
            areas.append(rows[:, columns.index("area")])
            integrated.append(rows[:, columns.index("intensity_integrated")])
            pending.append(rows)
            if sum(map(len, pending)) >= TABLE_CHUNK_ROWS:
                flush(last=False)
    flush(last=True)
    return (np.concatenate(areas) if areas else np.zeros(0)), (np.concatenate(integrated) if integrated else np.zeros(0))


def _write_pyramids(store: ResultStore, bases: Sequence[str], shapes: list[tuple[int, int]], average: str,
                    workers: int) -> None:
    """Levels 1.. of the arrays at `bases` (paths ending in "0"), each half the one before, written
    one output chunk per call, every array's chunks of a level on the `workers` threads at once;
    the array at `average` (the image) averaged, the others (labels) sampled."""

    def halve_chunk(task: tuple[zarr.Array, zarr.Array, int, int, bool]) -> None:
        source, out, top, left, averaged = task
        bottom, right = min(top + out.chunks[0], out.shape[0]), min(left + out.chunks[1], out.shape[1])
        bottom_read, right_read = min(2 * bottom, source.shape[0]), min(2 * right, source.shape[1])
        pixels = read_region(source, (2 * top, 2 * left), (bottom_read - 2 * top, right_read - 2 * left))
        write_region(out, (top, left), halve(pixels, averaged))

    previous = [store.region_array(base) for base in bases]
    for level, shape in enumerate(shapes[1:], start=1):
        targets = [store.blank_array(f"{base[:-1]}{level}", shape, source.dtype, source.chunks)
                   for base, source in zip(bases, previous, strict=True)]
        tasks = [(source, out, top, left, base == average) for base, source, out in zip(bases, previous, targets, strict=True)
                 for top in range(0, shape[0], out.chunks[0]) for left in range(0, shape[1], out.chunks[1])]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(halve_chunk, tasks))
        previous = targets


# All steps in one process -------------------------------------------------------------------------


@contextmanager
def opened(open_source: SourceOpener) -> Iterator[Source]:
    """A source from `open_source`, closed after use when it can be (a `formats.Plane`)."""
    source = open_source()
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def plane_opener(url: str, config: PredictConfig, storage_options: StorageOptions = None) -> SourceOpener:
    """Opens the plane of `url` that `config.selection` chooses, region by region."""
    return lambda: open_plane(url, config.selection, storage_options)


BlockProgress = Callable[[str, str, int, int], None]
"""Called as each block of an image finishes a step: (image id, "predict" or "measure", blocks
done, blocks in that step)."""


def segment_blockwise(store: ResultStore, image_id: str, url: str, open_source: SourceOpener, predictor: Predictor,
                      model: dict[str, Any], workers: int = 1, on_block: BlockProgress | None = None) -> dict[str, Any]:
    """Segment one image block by block into `store` (every step of the module, blocks on `workers`
    threads, each reading its own source) and return its record, with `seconds` and `pixels`;
    `on_block` hears of each block predicted (only those an earlier run left) and measured; once
    more from the start where its scratch proves damaged (`start_over_after`)."""
    try:
        return _segmented_blockwise(store, image_id, url, open_source, predictor, model, workers, on_block)
    except UndecodableChunk as error:
        if not start_over_after(store, image_id, url, error):
            raise
        return _segmented_blockwise(store, image_id, url, open_source, predictor, model, workers, on_block)


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


def _segmented_blockwise(store: ResultStore, image_id: str, url: str, open_source: SourceOpener, predictor: Predictor,
                         model: dict[str, Any], workers: int, on_block: BlockProgress | None) -> dict[str, Any]:
    started = time.monotonic()
    with opened(open_source) as source:
        count, todo = prepare_image(store, image_id, url, source, predictor, workers)
        shape = tuple(int(side) for side in source.shape)
    if not count:
        return {}  # finished by another run meanwhile

    def per_block(step: Callable[..., str], index: int, *args: Any) -> str:
        with opened(open_source) as block_source:
            return step(store, image_id, index, block_source, *args)

    def each_block(pool: ThreadPoolExecutor, name: str, indices: Sequence[int], step: Callable[..., str], *args: Any) -> None:
        futures = [pool.submit(per_block, step, index, *args) for index in indices]
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                future.result()
                if on_block is not None:
                    on_block(image_id, name, done, len(futures))
        except BaseException:  # Ctrl-C or a failed block: stop at the blocks under way, the rest are a rerun's
            for future in futures:
                future.cancel()
            raise

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            each_block(pool, "predict", todo, predict_block, predictor)
            stitched = stitch_image(store, image_id)
            logger.info("'%s': %d blocks predicted, %d cells after stitching (%.0f s)", redact_url(url), len(todo),
                        stitched["cells"], time.monotonic() - started)
            each_block(pool, "measure", range(count), measure_block)
        record = finish_image(store, image_id, model, workers)
    except BaseException:  # a failed block or Ctrl-C: a rerun with other settings need not wait for this one
        mark_stopped(store, image_id)
        raise
    return {**record, "seconds": time.monotonic() - started, "pixels": shape[0] * shape[1]} if record else {}
