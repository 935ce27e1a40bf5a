"""Cell-level scores of a model on its validation images, for training runs whose masks are
instance label images: the images are segmented exactly as `cellseg predict` segments them
(threshold, touching cells split, small cells dropped) and matched against the true cells."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cellseg.data import LoadedPair
from cellseg.instances import instance_scores, summarise_instance_scores
from cellseg.predict import Predictor


def validation_cell_scores(predictor: Predictor, pairs: Sequence[LoadedPair]) -> dict[str, Any]:
    """`summarise_instance_scores` over the pairs that have instance labels (F1 at IoU 0.5, DSB
    score, median count error, error classes), segmented with `predictor`'s model and settings;
    {} when none has labels.

    The pairs' images are already normalised the way the model expects (`load_pairs` with its
    normalisation), so they go to the network as they are.
    """
    labelled = [pair for pair in pairs if pair.instances is not None]
    if not labelled:
        return {}
    rows = []
    for pair in labelled:
        (maps,) = predictor.normalised_cell_maps([pair.image])
        rows.append(instance_scores(predictor.cell_labels(maps), pair.instances))
    return summarise_instance_scores(rows)
