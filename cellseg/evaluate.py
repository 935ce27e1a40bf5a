"""Compare the masks in a results store with ground-truth masks."""

from __future__ import annotations

from typing import Any

from cellseg.data import index_by_stem
from cellseg.io import StorageOptions, list_images, read_mask
from cellseg.metrics import MetricAccumulator, confusion_counts
from cellseg.store import ResultStore, StoreError


def evaluate_store(store: ResultStore, masks_url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """Pixel metrics of every done image that has a ground-truth mask of the same stem.

    Returns {"images", "mean", "pooled", "per_image", "missing_predictions"}; ground-truth masks
    with no finished prediction are listed in "missing_predictions" and not scored.
    """
    truths = index_by_stem(list_images(masks_url, storage_options), "mask")
    done = store.done_ids()
    scored = sorted(done & truths.keys())
    if not scored:
        raise StoreError(f"no image in '{store.url}' has a ground-truth mask under '{masks_url}'")
    accumulator, per_image = MetricAccumulator(), []
    for image_id in scored:
        truth = read_mask(truths[image_id], storage_options)
        prediction = store.read_mask(image_id)
        if truth.shape != prediction.shape:
            raise StoreError(
                f"mask '{truths[image_id]}' is {truth.shape[1]}x{truth.shape[0]}, "
                f"prediction for '{image_id}' is {prediction.shape[1]}x{prediction.shape[0]}"
            )
        counts = confusion_counts(prediction, truth)
        accumulator.add(counts)
        per_image.append({"image_id": image_id, **counts.scores()})
    return {
        "images": len(scored),
        "mean": accumulator.mean(),
        "pooled": accumulator.pooled(),
        "per_image": per_image,
        "missing_predictions": sorted(truths.keys() - done),
    }
