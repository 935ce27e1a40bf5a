"""Score segmentations against the truth: a results store against ground-truth masks and labels,
and a model against its validation images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cellseg.config import DEFAULT_CENTRE_PROMINENCE, PredictConfig
from cellseg.io import (
    DecodedMask,
    ImageReadError,
    StorageOptions,
    decode_mask,
    image_stem,
    list_images,
    mask_name_base,
    read_image_bytes,
    stacked_planes,
)
from cellseg.loaded_pairs import LoadedPair
from cellseg.mask_pixels import label_image, mask_and_labels
from cellseg.metrics import MetricAccumulator, ThresholdSweep, confusion_counts
from cellseg.pairs import masks_of_images
from cellseg.postprocess import CellMaps, cell_labels
from cellseg.redact import redact_url
from cellseg.scoring import (
    instance_scores,
    region_scores,
    summarise_instance_scores,
    summarise_region_scores,
    truth_regions,
)
from cellseg.store import ResultStore
from cellseg.store_checks import DamagedImage, StoreError, damage_summary
from cellseg.store_layout import CELLS_PATH, MASK_PATH

if TYPE_CHECKING:
    from cellseg.infer import Predictor


def evaluate_store(
    store: ResultStore, masks_url: str, storage_options: StorageOptions = None, labels_url: str | None = None
) -> dict[str, Any]:
    """Pixel metrics of every done image that has a ground-truth mask of the same stem, and with
    `labels_url` (ground-truth instance label images) cell-level metrics too. Without it, masks
    that are themselves label images (one integer per cell, as `train` reads them:
    `cellseg.mask_pixels.instance_labels`) are the labels.

    Returns {"images", "labelled_images", "mean", "pooled", "pixel_error", "regions", "per_image",
    "missing_predictions", "missing_truths"} ("labelled_images": how many were scored against instance labels) and,
    with labels for every scored image, "instances" (F1 at IoU 0.5, DSB2018 score, pooled
    precision/recall, median cell count error) with per-image instance scores merged into "per_image". Ground-truth masks with
    no finished prediction are listed in "missing_predictions", and done images with no mask in
    "missing_truths"; neither is scored. A damaged image
    that would be scored (unreadable metadata, missing arrays or chunks) gives no score at all:
    StoreError naming every such image and `cellseg verify --repair`.

    "pixel_error" holds both meanings of the term (see `cellseg.metrics`): "misclassified", the
    pooled fraction of wrong pixels, and "isbi2012", 1 - the best pooled F-score of the cell pixels
    over the probability thresholds 0.0-1.0 when every scored image was stored with its
    probabilities ("isbi2012_threshold" says which threshold), else 1 - the pooled Dice of the
    stored masks (one threshold, so never below the swept value; "isbi2012_threshold" None).

    "regions" holds the mean adapted Rand error, precision and recall of the stored cells against
    the true instance labels, or where an image has none against the 4-connected components of its
    mask (`cellseg.scoring.region_scores`).
    """
    listed_masks = list_images(masks_url, storage_options, kind="mask")
    # A folder of images beside their masks (a.png and a_masks.png, as Cellpose keeps them): every
    # file a mask by its suffix or an image with one. Elsewhere, a file named as its image and one
    # with a suffix both name it, which is refused as ambiguous.
    suffixed = {mask_name_base(image_stem(url)) for url in listed_masks} - {None}
    if suffixed and all(mask_name_base(image_stem(url)) is not None or image_stem(url) in suffixed
                        for url in listed_masks):
        listed_masks = [url for url in listed_masks if image_stem(url) not in suffixed]
    done = store.done_ids()
    # A mask is the image's name, or that and a mask suffix (img01_mask.png), as in training.
    truths, not_in_store, _ = masks_of_images(listed_masks, done | store.damaged.keys())
    true_labels = masks_of_images(list_images(labels_url, storage_options, kind="label"), done, "label")[0] \
        if labels_url else {}
    scored = sorted(done & truths.keys())
    # A score that silently left out a damaged image (or read its missing chunks as background)
    # would be a wrong answer: name them all instead, before any pixel is read.
    damaged = {image_id: problem for image_id, problem in store.damaged.items() if image_id in truths}
    with_probabilities, shapes = [], {}
    for image_id in scored:
        try:
            mask = store.array(image_id, MASK_PATH)
            assert mask is not None  # every done image has a mask: `array` raises DamagedImage without one
            shapes[image_id] = mask.shape
            store.array(image_id, CELLS_PATH)
            with_probabilities.append(store.has_probabilities(image_id))
        except DamagedImage as error:
            damaged[image_id] = error.problem
    if damaged:
        raise StoreError(f"no score: {damage_summary(store.url, damaged)}")
    if not listed_masks:
        raise StoreError(f"no mask images under '{masks_url}': nothing to score '{store.url}' against")
    if not done:
        raise StoreError(f"'{store.url}' holds no finished image to score")
    if not scored:
        raise StoreError(f"no image in '{store.url}' has a ground-truth mask under '{masks_url}' (masks are matched to "
                         f"images by name: the store has {_some(done)}, the masks are {_some(map(image_stem, listed_masks))})")
    accumulator, per_image = MetricAccumulator(), []
    sweep = ThresholdSweep() if all(with_probabilities) else None
    for image_id in scored:
        decoded = _truth_file(truths[image_id], "mask", storage_options)
        truth, labels_in_mask = mask_and_labels(decoded, truths[image_id])
        if truth.shape != (predicted := shapes[image_id]):  # before the prediction is read: it may be a slide's
            raise StoreError(f"mask '{truths[image_id]}' is {truth.shape[1]}x{truth.shape[0]}, "
                             f"prediction for '{image_id}' is {predicted[1]}x{predicted[0]}")
        try:  # a chunk that cannot be decoded: every such image is named at the end, none scored
            prediction = store.read_mask(image_id)
            probabilities = store.read_probabilities(image_id) if sweep is not None else None
            cells = store.read_cells(image_id)
        except DamagedImage as error:
            damaged[image_id] = error.problem
            continue
        if damaged:  # no score will be given: only the other images' damage is still looked for
            continue
        counts = confusion_counts(prediction, truth)
        accumulator.add(counts)
        if sweep is not None and probabilities is not None:
            sweep.add(probabilities, truth)
        row = {"image_id": image_id, **counts.scores()}
        labels: np.ndarray | None
        if labels_url:
            if image_id not in true_labels:
                raise StoreError(f"no ground-truth label image for '{image_id}' under '{labels_url}'")
            labels = _truth_file(true_labels[image_id], "label image", storage_options).pixels
            if labels.dtype.kind in "iu":
                labels = label_image(labels, true_labels[image_id])
            if labels.shape != truth.shape:
                raise StoreError(f"label image '{true_labels[image_id]}' is {labels.shape[1]}x{labels.shape[0]}, its "
                                 f"mask '{truths[image_id]}' {truth.shape[1]}x{truth.shape[0]}")
        else:
            labels = labels_in_mask
        if labels is not None:
            row.update({f"instance_{key}": value for key, value in instance_scores(cells, labels).items()})
        row.update(region_scores(cells, truth_regions(truth) if labels is None else labels))
        per_image.append(row)
    if damaged:
        raise StoreError(f"no score: {damage_summary(store.url, damaged)}")
    instance_rows = [{key[len("instance_"):]: value for key, value in row.items() if key.startswith("instance_")}
                     for row in per_image]
    result = {
        "images": len(scored),
        "labelled_images": sum(map(bool, instance_rows)),
        "mean": accumulator.mean(),
        "pooled": accumulator.pooled(),
        "pixel_error": _pixel_errors(accumulator, sweep),
        "regions": summarise_region_scores(per_image),
        "per_image": per_image,
        "missing_predictions": sorted({mask_name_base(stem) or stem for stem in map(image_stem, not_in_store)}
                                      | (truths.keys() - done)),
        "missing_truths": sorted(done - truths.keys()),
    }
    if all(instance_rows):
        result["instances"] = summarise_instance_scores(instance_rows)
    return result


def _truth_file(url: str, role: str, storage_options: StorageOptions) -> DecodedMask:
    """A mask or label file decoded, refused naming it when it holds a stack of planes: which of
    them is the truth of its image cannot be known (reading the first scored against an empty one)."""
    data = read_image_bytes(url, storage_options)
    decoded = decode_mask(data, url)  # a damaged file is refused here, naming it
    if (planes := stacked_planes(data)) > 1:
        raise ImageReadError(f"{role} '{redact_url(url)}' is a stack of {planes} planes (z, time points or channels); "
                             "a mask or label image is one plane: save the plane that belongs to its image as a file "
                             "of its own")
    return decoded


def _some(names: Iterable[str], shown: int = 3) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:shown]) + (", ..." if len(ordered) > shown else "")


def _pixel_errors(accumulator: MetricAccumulator, sweep: ThresholdSweep | None) -> dict[str, float | None]:
    total = accumulator.total()
    if sweep is None:
        return {"misclassified": total.misclassified, "isbi2012": 1.0 - total.scores()["dice"], "isbi2012_threshold": None}
    threshold, dice = sweep.best()
    return {"misclassified": total.misclassified, "isbi2012": 1.0 - dice, "isbi2012_threshold": threshold}


def validation_cell_scores(predictor: Predictor, pairs: Sequence[LoadedPair]) -> dict[str, Any]:
    """`summarise_instance_scores` over the pairs that have instance labels (F1 at IoU 0.5, DSB
    score, median count error, error classes), segmented exactly as `cellseg predict` segments
    them with `predictor`'s model and settings; {} when none has labels.

    The pairs' images are already normalised the way the model expects (`load_pairs` with its
    normalisation), so they go to the network as they are.
    """
    labelled = [(pair.image, pair.instances) for pair in pairs if pair.instances is not None]
    if not labelled:
        return {}
    rows = []
    for image, instances in labelled:
        (maps,) = predictor.normalised_cell_maps([image])
        rows.append(instance_scores(cell_labels(maps, predictor.config), instances))
    return summarise_instance_scores(rows)


THRESHOLDS = (0.3, 0.4, 0.5, 0.6)  # probability thresholds a model's default is chosen from
# How far a centre must rise on the distance map, for a model with one; chosen likewise.
PROMINENCES = (0.05, 0.1, 0.15, 0.2)
Choice = tuple[bool, float, float]  # (split touching cells, probability threshold, centre prominence)


def choose_postprocessing(predictor: Predictor, pairs: Sequence[LoadedPair],
                          given: PredictConfig | None = None) -> tuple[Choice, dict[Choice, dict[str, Any]]]:
    """The post-processing that suits `predictor`'s model best on the validation `pairs`
    (`postprocessing_decision` on its maps of their images), and the scores of every choice; what
    `given` states (split, threshold, centre prominence) is kept, the rest is chosen."""
    labelled = any(pair.instances is not None for pair in pairs)
    scored = [pair for pair in pairs if pair.instances is not None or not labelled]
    # One image's maps at a time: all of a validation set's took 12 bytes a pixel of every image.
    maps = (predictor.normalised_cell_maps([pair.image])[0] for pair in scored)
    truths = (pair.instances if pair.instances is not None else truth_regions(pair.mask) for pair in scored)
    given = given or PredictConfig()
    return postprocessing_decision(
        maps, truths, predictor.config, labelled,
        splits=(True, False) if given.split_touching is None else (given.split_touching,),
        thresholds=THRESHOLDS if given.threshold is None else (given.threshold,),
        prominences=None if given.centre_prominence is None else (given.centre_prominence,))


def postprocessing_decision(
    maps: Iterable[CellMaps], truths: Iterable[np.ndarray], config: PredictConfig, labelled: bool,
    splits: Sequence[bool] = (True, False), thresholds: Sequence[float] = THRESHOLDS,
    prominences: Sequence[float] | None = None,
) -> tuple[Choice, dict[Choice, dict[str, Any]]]:
    """Whether to separate touching cells, at which probability threshold and, for a model with a
    distance map, at which centre prominence (`prominences`, default `PROMINENCES`; others keep
    `DEFAULT_CENTRE_PROMINENCE`), judged on predicted `maps` against true regions, and the scores of
    every choice: cell F1 at IoU 0.5 (mean over images) when the truths are instance labels
    (`labelled`), else the adapted Rand error against the masks' 4-connected components (as for
    EM, where a split cuts membrane-bounded regions the mask already separates). Ties go to
    splitting, to the threshold nearest 0.5 and to the prominence nearest the default; no images:
    (True, 0.5, the default). The maps are read once, an image at a time."""
    rows: dict[Choice, list[dict[str, Any]]] = {}
    configs: dict[Choice, PredictConfig] = {}
    for cell_maps, truth in zip(maps, truths, strict=True):
        if not configs:  # the first image's maps say whether the model has a distance map
            if prominences is None:
                prominences = PROMINENCES if cell_maps.distance is not None else (DEFAULT_CENTRE_PROMINENCE,)
            # Unsplit cells do not depend on the prominence: one choice per threshold.
            configs = {(split, threshold, prominence): config.model_copy(
                           update={"split_touching": split, "threshold": threshold, "centre_prominence": prominence})
                       for split in splits for threshold in thresholds
                       for prominence in (prominences if split else prominences[:1])}
        for choice, choice_config in configs.items():
            cells = cell_labels(cell_maps, choice_config)
            rows.setdefault(choice, []).append(instance_scores(cells, truth) | region_scores(cells, truth))
    if not rows:
        return (True, 0.5, DEFAULT_CENTRE_PROMINENCE), {}
    scores = {choice: summarise_instance_scores(found) | summarise_region_scores(found) for choice, found in rows.items()}

    def merit(choice: Choice) -> tuple[float, bool, float, float]:
        found = scores[choice]
        score = found["f1_mean"] if labelled else -found["adapted_rand_error_mean"]
        return score, choice[0], -abs(choice[1] - 0.5), -abs(choice[2] - DEFAULT_CENTRE_PROMINENCE)

    return max(scores, key=merit), scores
