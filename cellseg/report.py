"""The pictures a run leaves behind: training curves and a validation overlay gallery next to the
checkpoint, a montage of segmented images next to a results store."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.config import SelectionConfig
from cellseg.formats import read_source
from cellseg.infer import Predictor
from cellseg.loaded_pairs import LoadedPair
from cellseg.pictures import overlay_gallery, panel_step, segmentation_montage, training_curves
from cellseg.store import ResultStore
from cellseg.store_layout import IMAGE_PATH, MASK_PATH

CURVES_FILE = "training_curves.png"
GALLERY_FILE = "validation_gallery.png"


def training_pictures(
    run_dir: str | Path, history: Sequence[dict[str, float]], val_pairs: Sequence[LoadedPair],
    predictor: Predictor, max_images: int = 8, start: Mapping[str, float] | None = None,
    best_epoch: int | None = None,
) -> list[str]:
    """Write `training_curves.png` and, with validation images, `validation_gallery.png` (the
    outlines of `predictor`'s masks, as `cellseg predict` thresholds them, over the first
    `max_images`) into `run_dir`; returns their paths. `start`: a fine-tuning run's starting
    weights' validation metrics, drawn as epoch 0; `best_epoch`: the epoch of best.pt, marked."""
    run = Path(run_dir)
    written = [training_curves(history, str(run / CURVES_FILE), start=start, best_epoch=best_epoch)]
    if val_pairs:
        shown = list(val_pairs)[:max_images]
        predictions = [probability > predictor.threshold
                       for probability in predictor.normalised_probabilities([pair.image for pair in shown])]
        written.append(overlay_gallery([p.image for p in shown], [p.mask for p in shown], predictions,
                                       [p.id for p in shown], str(run / GALLERY_FILE)))
    return written


def montage_url(store_url: str, run_name: str) -> str:
    """Where a run's montage goes: beside the store (`<store>-montages/<run>.png`), not inside it."""
    return f"{store_url.rstrip('/')}-montages/{run_name}.png"


def store_montage(
    store: ResultStore, images: Iterable[tuple[str, str]], url: str, max_images: int = 6
) -> str | None:
    """Montage of the first `max_images` of `images` ((id, source URL) pairs) that the store holds
    as done; None when none is. Each is read at about the panel's size (every n-th row and column):
    six 2048² images read whole took 931 MB to draw, a 16,384² one alone would take some 15 GB."""
    # Lazily: a run of 100,000 images asks the store about the first few, not about every one.
    shown = list(itertools.islice(((image_id, source) for image_id, source in images if store.is_done(image_id)),
                                  max_images))
    if not shown:
        return None
    views = [_montage_view(store, image_id, source) for image_id, source in shown]
    return segmentation_montage([image for image, _, _ in views], [cells for _, cells, _ in views],
                                [image_id for image_id, _ in shown], url, counts=[count for _, _, count in views])


def _montage_view(store: ResultStore, image_id: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(image, cell labels, cell count) of a done image for its panel: every `panel_step`-th row
    and column."""
    record = store.record(image_id)
    mask = store.array(image_id, MASK_PATH, record)
    assert mask is not None  # a done image has a mask: `array` raises DamagedImage without one
    step = panel_step(mask.shape)
    cells = store.read_cells(image_id, step)
    statistics = record.get("statistics")
    count = statistics.get("cell_count") if isinstance(statistics, dict) else None
    return (_segmented_image(store, image_id, source, record, step), cells,
            count if type(count) is int else int(cells.max(initial=0)))  # the count of cells a step may skip


def _segmented_image(store: ResultStore, image_id: str, source: str, record: dict[str, Any], step: int) -> np.ndarray:
    """The plane an image's result was segmented from (every `step`-th row and column): the
    store's copy of it, else its source read again with the selection its record names (a channel
    of an OME-TIFF, a time point, a field)."""
    if store.array(image_id, IMAGE_PATH, record) is not None:
        return store.read_image(image_id, step)
    chosen = record.get("model", {}).get("predict", {}).get("selection")
    return np.ascontiguousarray(read_source(source, SelectionConfig.model_validate(chosen or {}))[0][::step, ::step])
