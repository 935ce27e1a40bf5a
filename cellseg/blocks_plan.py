"""Step 1 of a block-wise image (`cellseg.blocks`): its plan, made once however many runs start on
the image at once (claimed without overwriting, the others taking it up), or the plan an earlier
run left taken up; a plan with other settings left to its run while it works; the image's levels,
empty blocks and cell size measured; its arrays made."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg.blocks_levels import Levels, image_levels
from cellseg.blocks_predict import window_maps, window_tile
from cellseg.blocks_scratch import ACTIVE_WAIT, Scratch, blank_mark, idle_seconds, plan_settings, scratch_damage
from cellseg.blocks_source import Source, region
from cellseg.config import PredictConfig
from cellseg.formats_plane import Plane
from cellseg.infer import Predictor
from cellseg.json_values import finite_json
from cellseg.normalize import histogram_lut
from cellseg.redact import redact_url
from cellseg.scale import prediction_factor
from cellseg.source_record import cell_diameter_pixels, source_record
from cellseg.stitch import SCRATCH_LAYOUT, TODO, BlockGrid
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.store_layout import CELLS_PATH, CHUNK_SIDE, IMAGE_PATH, MASK_PATH, METADATA_ERRORS, PROBABILITIES_PATH
from cellseg.store_writes import recorded_source

logger = logging.getLogger("cellseg.blocks")  # block-wise segmentation's one logger, whichever of its modules speaks

NONE, PLANNING, PLANNED, DAMAGED = "none", "planning", "planned", "damaged"  # an image's scratch, as `_planned` finds it
PLAN_WAIT = 120.0  # seconds a plan being written may take (its arrays' metadata) before it counts as left by a stopped run
PLAN_POLL = 0.5  # seconds between looks at a plan another run is writing


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
            "source_url": redact_url(url), **plan_settings(predictor)}
    found, group = _planned(store, image_id)
    if group is not None and found == PLANNED:
        if group.attrs["plan"] == plan:
            scratch = Scratch(store, image_id, group, dict(group.attrs))
            if not (damage := scratch_damage(scratch)):
                return _taken_up(scratch)
            logger.warning("'%s': the blocks an earlier run left are damaged (%s); segmenting it from the start",
                           redact_url(url), "; ".join(damage))
            found = DAMAGED
        elif (idle := idle_seconds(store, image_id)) < ACTIVE_WAIT:
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
             if levels.flat or levels.brightest(index, lut) < config.blocks.empty_level]
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
        blank_mark(store, image_id)[...] = np.array([time.time()])
        group.attrs.put(finite_json({  # zarr refuses numpy's scalars but float64, and any in a record fails every block
            "predict": config.model_dump(mode="json"), "normalization": normalization.model_dump(mode="json"),
            "levels": asdict(levels), "empty": empty, "scale": scale, "source": described, "resumed": 0, "plan": plan}))
    except BaseException:  # stopped before the plan was written (Ctrl-C, a failed write): a rerun plans at once
        _withdraw_claim(store, image_id, claim)
        raise
    logger.info("'%s': %d x %d pixels in %d blocks of %d (%d empty)", redact_url(url), height, width, grid.count,
                grid.block, len(empty))
    return grid.count, list(range(grid.count))


class ImageInUse(StoreError):
    """Another run with other settings or another model is segmenting the image block by block."""


def _busy(url: str, idle: float) -> ImageInUse:
    return ImageInUse(f"'{redact_url(url)}' is being segmented block by block by another run with other settings or "
                      f"another model (its last step {idle:.0f} s ago); run again once it has finished, or, if it was "
                      f"stopped, {ACTIVE_WAIT / 60:.0f} minutes after its last step")


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
    other settings is left to it: StoreError. An image another run finished while this one read it
    for its plan is left as it is: (None, (0, []))."""
    path = f"{image_id}/blocks"
    waited_on: Any = None
    while True:
        found, group = _planned(store, image_id)
        if group is not None and found == PLANNED:
            if group.attrs["plan"] == plan:
                return None, _taken_up(Scratch(store, image_id, group, dict(group.attrs)))
            raise _busy(url, idle_seconds(store, image_id))
        if found == DAMAGED:
            del store.root[path]
            continue
        if found == NONE:
            # No scratch: none yet, or another run has finished the image meanwhile (its done mark is
            # written before its scratch goes) while this one read it for its plan: left as it is.
            if store.is_done(image_id):
                return None, (0, [])
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
    maps = window_maps(predictor, levels.normalise(region(source, window), lut), None, window_tile(grid, config))
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
