"""Find the damage in a results store and repair it: `cellseg verify STORE [--repair]`.

The store's own metadata and every image group are checked: the group's metadata can be read and is
a cellseg record, and a done image has every array it was written with (present, its metadata
readable, every chunk stored), of its recorded shape and type, under label and table groups whose
metadata can be read, with one cell-table row per counted cell and finite statistics. A block-wise
image's pyramid levels 1.. of its image copy, mask and cell labels (`cellseg.blocks`) are checked as
level 0 is, each of the shape that halving gives. Only metadata is read and chunk keys listed,
unless `read_data` decodes every chunk too. Repairing marks each broken image not done (a failure
"damaged: …", replacing metadata that cannot be read) so that the next `predict` or `segment-images`
run segments it again; nothing of a healthy image is touched, and no array is deleted but the damaged
block-wise scratch of an unfinished image (checked for the chunks its blocks wrote), which the next
run then plans afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from cellseg.config import BlockConfig
from cellseg.io import StorageOptions
from cellseg.stitch import SCRATCH_LAYOUT, BlockGrid, pyramid_shapes
from cellseg.store import ResultStore
from cellseg.store_blockwise import lost_scratch_chunks, read_block_states
from cellseg.store_checks import DONE, DamagedImage, DamagedStore, StoreError, describe
from cellseg.store_layout import (
    ARRAYS,
    CELL_TABLE,
    CELLS_PATH,
    CHUNK_ERRORS,
    IMAGE_PATH,
    MASK_PATH,
    METADATA_ERRORS,
    StoreMode,
)
from cellseg.store_open import repair_store_metadata, repairable

STATUSES = (DONE, "failed", "writing")
STORE_METADATA = "zarr.json"  # the `image_id` of damage to the store's own metadata
PYRAMIDS = (IMAGE_PATH, MASK_PATH, CELLS_PATH)  # the arrays a block-wise image has levels 1.. of (blocks.finish_image)


@dataclass(frozen=True)
class Damage:
    """What is wrong with one image, its problems joined by '; ' (or, as `image_id`
    STORE_METADATA, with the store's own metadata)."""

    image_id: str
    problem: str
    scratch: bool = False  # the damage is in an unfinished image's block-wise scratch, which repair deletes


@dataclass
class Verification:
    """The outcome of `verify_store`: images checked, what is broken, and whether it was repaired."""

    url: str
    checked: int = 0
    broken: list[Damage] = field(default_factory=list)
    repaired: bool = False
    unrepaired: list[Damage] = field(default_factory=list)  # broken images a repair could not mark, and why
    images_checked: bool = True  # False when the store's metadata is unreadable and was not repaired
    repairable: bool = True  # False when --repair could not rewrite that metadata: no cellseg image under it


def verify_store(
    url: str, repair: bool = False, storage_options: StorageOptions = None, read_data: bool = False,
    on_image: Callable[[str], None] | None = None,
) -> Verification:
    """Check the store at `url` (`on_image` is called per image checked) and, with `repair`,
    mark every broken image not done. Its images cannot be checked while the store's own
    metadata is unreadable: without `repair` only that is reported; with it, that metadata is
    rewritten first (refused, StoreError, unless an image group shows it is a cellseg store)."""
    report = Verification(url)
    mode: StoreMode = "r+" if repair else "r"
    try:
        # Read first, also to repair: a store that is none (another tool's group) is named as one read.
        store = ResultStore.open(url, mode="r", storage_options=storage_options)
        if repair:
            store = ResultStore.open(url, mode=mode, storage_options=storage_options)
    except DamagedStore as error:
        report.broken.append(Damage(STORE_METADATA, str(error)))
        if not repair:
            report.images_checked = False
            report.repairable = repairable(url, storage_options)
            return report
        repair_store_metadata(url, storage_options)
        store = ResultStore.open(url, mode=mode, storage_options=storage_options)
    for image_id, record, problem in store.entries():
        if record is None and problem is None:  # a stray object, no image
            continue
        problems = [problem] if problem is not None else image_problems(store, image_id, record or {}, read_data)
        report.checked += 1
        if problems:
            unfinished = problem is None and (record or {}).get("status") != DONE
            report.broken.append(Damage(image_id, "; ".join(dict.fromkeys(problems)), scratch=unfinished))
        if on_image:
            on_image(image_id)
    report.broken += [Damage(name, f"'{name}/zarr.json' is missing") for name in store.orphans()]
    if repair:
        for damage in report.broken:
            if damage.image_id != STORE_METADATA:
                try:
                    store.mark_damaged(damage.image_id, damage.problem)
                except StoreError as refused:  # an array where the image belongs, say: said, and the others repaired
                    report.unrepaired.append(Damage(damage.image_id, str(refused)))
                    continue
            if damage.scratch:  # the next run plans the image afresh instead of failing on the blocks left
                del store.root[f"{damage.image_id}/blocks"]
        report.repaired = True
    return report


def image_problems(store: ResultStore, image_id: str, record: dict[str, Any], read_data: bool = False) -> list[str]:
    """What is wrong with one image whose record could be read; [] when nothing is."""
    status = record.get("status")
    if status is not None and status not in STATUSES:
        return [f"its status {status!r} is none of {', '.join(STATUSES)}"]
    if status != DONE:
        return _scratch_problems(store, image_id, read_data)  # the next run segments it, from the blocks left
    problems = [f"its statistic {key!r} is {value!r}, not a finite number"
                for key, value in record["statistics"].items() if not _finite_or_none(value)]
    count = record["statistics"].get("cell_count")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        problems.append(f"its statistic 'cell_count' is {count!r}, not a count of cells")
    shape = tuple(record["shape"])
    shapes, levels_problem = _level_shapes(record)
    problems += [levels_problem] if levels_problem else []
    listed = list(record.get("arrays", ARRAYS))
    if MASK_PATH not in listed:  # every result has its mask; reads look for it whatever `arrays` says
        problems.append(f"its record's 'arrays' {listed!r} do not list its mask '{MASK_PATH}'")
        listed.append(MASK_PATH)
    for path in listed:
        if path not in ARRAYS:
            problems.append(f"its record names an array '{path}' that no cellseg image has")
            continue
        array = None
        try:
            array = store.array(image_id, path, record)
            if array is None:
                continue
            problems += _parent_problems(store, image_id, path)
            what, dtype = ARRAYS[path]
            expected = (record["statistics"].get("cell_count"), len(store.table_columns(image_id, array))) \
                if path == CELL_TABLE else shape
            problems += _content_problems(array, f"its {what} '{image_id}/{path}'", expected, dtype, read_data)
        except DamagedImage as error:
            problems.append(error.problem)
        if path in PYRAMIDS and len(shapes) > 1:
            level_dtype = ARRAYS[path][1] or (array.dtype if array is not None else None)
            problems += _level_problems(store, image_id, path, shapes, level_dtype, read_data)
    return problems


def _scratch_problems(store: ResultStore, image_id: str, read_data: bool) -> list[str]:
    """What is wrong with the block-wise scratch an unfinished image holds (`cellseg.blocks`), which
    the next run would take up: its metadata or state unreadable, a chunk its blocks' progress says
    was written not stored (it would read as zeros: `stitch.scratch_chunks`), and with `read_data` a
    chunk that cannot be decoded. [] without a scratch, for one being planned, and for an older
    cellseg's, which the next run starts over."""
    path = f"{image_id}/blocks"
    try:
        group = store.root.get(path)
        if not isinstance(group, zarr.Group):
            return []
        attributes: dict[str, Any] = dict(group.attrs)
        plan = attributes.get("plan")
        if not isinstance(plan, dict) or plan.get("scratch") != SCRATCH_LAYOUT:
            return []
        blocks = BlockConfig.model_validate(attributes["predict"]["blocks"])
        grid = BlockGrid((int(plan["shape"][0]), int(plan["shape"][1])), blocks.block_size, blocks.overlap)
        arrays = dict(group.arrays())
        state = read_block_states(arrays["state"], grid, blocks.max_pixels)
        problems = lost_scratch_chunks(path, arrays.__getitem__, grid, state, attributes.get("stitch"))
    except (KeyError, TypeError, ValueError, *METADATA_ERRORS, *CHUNK_ERRORS) as error:
        return [f"its block-wise scratch '{path}' cannot be read ({describe(error)})"]
    if read_data:
        problems += [f"its block-wise scratch '{path}/{name}' has a chunk {undecodable}"
                     for name, array in sorted(arrays.items()) if (undecodable := _undecodable_chunk(array))]
    return problems


def _level_shapes(record: dict[str, Any]) -> tuple[list[tuple[int, int]], str | None]:
    """(the shape of each pyramid level, level 0 first; a problem with the recorded count or None):
    a block-wise image records how many levels it has, each half the one before
    (`stitch.pyramid_shapes`); an image written whole has level 0 only."""
    shape = (int(record["shape"][0]), int(record["shape"][1]))
    if "blocks" not in record:
        return [shape], None
    blocks = record["blocks"]
    levels = blocks.get("levels") if isinstance(blocks, dict) else None
    halvings = pyramid_shapes(shape, 1)  # every level halving can give, down to one pixel
    if not (isinstance(levels, int) and not isinstance(levels, bool) and 1 <= levels <= len(halvings)):
        return [shape], f"its 'blocks' record has levels {levels!r}, not a count of 1 to {len(halvings)}"
    return halvings[:levels], None


def _level_problems(store: ResultStore, image_id: str, path: str, shapes: list[tuple[int, int]], dtype: Any,
                    read_data: bool) -> list[str]:
    """Problems of levels 1.. of the array at `path` (a PYRAMIDS path, level 0 at "…/0"), checked as
    `ResultStore.array` checks level 0: present, metadata readable, every chunk stored; then of
    shape `shapes[level]` and type `dtype` (None: any), and with `read_data` every chunk decodes,
    one chunk at a time (a level can be bigger than memory)."""
    problems = []
    for level, expected in enumerate(shapes[1:], start=1):
        where = f"{image_id}/{path[:-1]}{level}"
        what = f"its {ARRAYS[path][0]} level {level}"
        try:
            node = store.root.get(where)
        except METADATA_ERRORS as error:
            problems.append(f"the metadata of {what}, '{where}/zarr.json', cannot be read ({describe(error)})")
            continue
        if not isinstance(node, zarr.Array):
            problems.append(f"{what} '{where}' is missing")
            continue
        if missing := node.nchunks - node.nchunks_initialized:
            problems.append(f"{what} '{where}' is missing {missing} of {node.nchunks} chunks")
            continue
        problems += _content_problems(node, f"{what} '{where}'", expected, dtype, read_data)
    return problems


def _content_problems(array: zarr.Array, named: str, shape: tuple[int, ...], dtype: Any, read_data: bool) -> list[str]:
    """Problems of an array that is there with every chunk (`named` as messages call it): not of
    `shape` or of `dtype` (None: any), and with `read_data` a chunk that cannot be decoded."""
    problems = []
    if array.shape != shape:
        problems.append(f"{named} has shape {array.shape}, expected {shape}")
    if dtype is not None and array.dtype != dtype:
        problems.append(f"{named} is {array.dtype}, expected {dtype}")
    if read_data and (undecodable := _undecodable_chunk(array)):
        problems.append(f"{named} has a chunk {undecodable}")
    return problems


def _undecodable_chunk(array: zarr.Array) -> str | None:
    """'(row, column) that cannot be decoded (why)' for the first chunk of `array` that cannot be; None."""
    for index in np.ndindex(*array.cdata_shape):
        try:
            array.blocks[index]
        except CHUNK_ERRORS as error:
            return f"{index} that cannot be decoded ({describe(error)})"
    return None


def _parent_problems(store: ResultStore, image_id: str, path: str) -> list[str]:
    """Problems of the groups between an image and one of its arrays (labels/, labels/mask/, …),
    whose metadata NGFF readers need even where cellseg does not."""
    parts = path.split("/")[:-1]
    problems = []
    for depth in range(1, len(parts) + 1):
        group = f"{image_id}/{'/'.join(parts[:depth])}"
        try:
            node = store.root.get(group)
        except METADATA_ERRORS as error:
            problems.append(f"the metadata '{group}/zarr.json' cannot be read ({describe(error)})")
            continue
        if node is None:
            problems.append(f"'{group}/zarr.json' is missing")
    return problems


def _finite_or_none(value: Any) -> bool:
    """Whether a statistic is null or a finite number (JSON has no NaN; Python's json reads it)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
