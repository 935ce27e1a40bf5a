"""Images bigger than memory, segmented block by block and stitched (docs/store.md, "Images bigger
than memory").

An image above `BlockConfig.above_pixels` is never held whole: not its pixels, not a probability
map, not its labels. Its blocks' cores are whole chunks of the store (`stitch.BlockGrid`); each
block is predicted by the Predictor and its tiling on a window reaching `overlap` pixels past its
core, and writes only its core. The steps, each a task of the segment-images flow
(`segment_blockwise` runs them on a thread pool, without Prefect):

1. `prepare_image` (`blocks_plan`): the plan; one pass over the image for its histogram, so that
   every block is normalised exactly as the whole image would be, and for each block's range, the
   cheap foreground test (`blocks_levels`); for a model at a cell size, the image's cell size
   measured once; the arrays.
2. `predict_block` (`blocks_predict`), per block: cell labels of its window; writes its core's
   image copy, mask and probabilities, its core's labels under block-local numbers (scratch,
   `blocks_scratch`), the same labels of its core's edge bands (the `overlap` pixels inside each
   side: what its neighbours' rings cover) and its labels of the ring around its core. A block
   whose core has no pixel above `empty_level` skips the model and is recorded as empty: no cell
   can have a part there.
3. `stitch_image` (`blocks_stitch`), once: the labels that are one cell across a seam are joined,
   and every cell gets its final label.
4. `measure_block` (`blocks_measure`), per block: the final labels of its core, and the table rows
   of its cells.
5. `finish_image` (`blocks_finish`), once: the cell table, the statistics, the pyramid (each level
   half the one before), the NGFF metadata and the done mark; the scratch is removed.

Stitching rule: a block keeps the cells of its core under its own numbers; its neighbours label
the ring of pixels around that core (`overlap` wide) from their windows, and keep them in their
cores. A label of the block's view of the ring and a label written there by a neighbour are one
cell when each is the other's largest overlap in that neighbour's part of the ring, their
intersection over union there is at least 0.5, and that part holds at least a tenth of the
view label's ring (`stitch.seam_pairs`); joined by union-find, a cell crossing a seam or a corner
of four blocks becomes one label. Cells are numbered 1..N in the order of the first block (raster order)
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cellseg.blocks_finish import finish_image
from cellseg.blocks_measure import measure_block
from cellseg.blocks_plan import prepare_image
from cellseg.blocks_predict import predict_block
from cellseg.blocks_scratch import mark_stopped, start_over_after
from cellseg.blocks_source import SourceOpener, opened
from cellseg.blocks_stitch import stitch_image
from cellseg.config import PredictConfig
from cellseg.formats import open_plane, reads_region_by_region
from cellseg.formats_tiff import OversizedSegment
from cellseg.infer import Predictor
from cellseg.io import StorageOptions
from cellseg.redact import redact_url
from cellseg.store import ResultStore
from cellseg.waiting import as_completed_awake
from cellseg.zarr_writes import UndecodableChunk

logger = logging.getLogger(__name__)


def blockwise_shape(url: str, config: PredictConfig, storage_options: StorageOptions = None) -> tuple[int, int] | None:
    """The (H, W) of an image to segment block by block: one read region by region (TIFF, OME-Zarr,
    CZI/ND2/LIF, or a time point `#t=N` of one: `formats.reads_region_by_region`) with more than
    `config.blocks.above_pixels` pixels; None for any other (PNG and JPEG are decoded whole anyway)
    and for a file that cannot be opened (reading it says why)."""
    if not reads_region_by_region(url):
        return None
    try:
        with open_plane(url, config.selection, storage_options) as plane:
            height, width = plane.shape
    except OversizedSegment as error:  # too large for the whole-image path too: the block path says why
        height, width = error.shape
    except Exception:  # noqa: BLE001 - the whole-image path records why it cannot be read
        return None
    return (height, width) if height * width > config.blocks.above_pixels else None


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
            for done, future in enumerate(as_completed_awake(futures), start=1):
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
