"""benchmarks.error_sources: the labellings that isolate foreground and split, and the outline figures."""

import numpy as np
from scipy import ndimage

from benchmarks.error_sources import below_half_contrast, hits, innermost_seeds, labelled_ways
from cellseg.config import PredictConfig
from cellseg.postprocess import CellMaps
from cellseg.scoring import instance_scores
from cellseg.targets import normalised_distance


def _disc(shape, centre, radius):
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def _touching_cells() -> np.ndarray:
    """Two discs that touch along a line (labels 1 and 2) and one apart (3)."""
    truth = np.zeros((64, 96), dtype=np.int32)
    truth[_disc(truth.shape, (32, 22), 11)] = 1
    truth[_disc(truth.shape, (32, 42), 11) & (truth == 0)] = 2
    truth[_disc(truth.shape, (32, 78), 9)] = 3
    return truth


def test_innermost_seeds_give_touching_cells_one_seed_each_and_skip_what_is_outside():
    truth = _touching_cells()
    seeds = innermost_seeds(truth, truth > 0)
    assert seeds.max() == 3
    for number in (1, 2, 3):
        assert np.count_nonzero(seeds == number) == 1
        assert len(set(truth[seeds == number])) == 1
    assert set(truth[seeds > 0]) == {1, 2, 3}
    assert innermost_seeds(truth, truth != 2).max() == 2  # nucleus 2 lies outside `within`


def test_labelled_ways_are_exact_for_exact_maps_and_isolate_a_bad_foreground():
    truth = _touching_cells()
    config = PredictConfig(threshold=0.5, centre_prominence=0.1, split_touching=True, min_cell_area=10)
    exact = CellMaps((truth > 0).astype(np.float32), normalised_distance(truth))
    for name, labels in labelled_ways(exact, truth, config).items():
        assert instance_scores(labels, truth)["f1"] == 1.0, name
    # A foreground missing the lone nucleus: only the ways given the true foreground find it.
    shrunk = CellMaps(np.where(truth == 3, 0.0, exact.probability).astype(np.float32), exact.distance)
    ways = {name: instance_scores(labels, truth)["f1"] for name, labels in labelled_ways(shrunk, truth, config).items()}
    assert ways["as predicted"] < 1 and ways["true seeds"] < 1
    assert ways["true foreground"] == 1.0 and ways["both true"] == 1.0


def test_hits_report_missed_nuclei_and_tight_outlines():
    truth = _touching_cells()
    predicted = ndimage.grey_erosion(np.where(truth == 3, 0, truth), size=3)  # one missed, the others a pixel tighter
    best, ratios = hits(predicted, truth)
    assert best[2] == 0 and (best[:2] > 0.5).all()
    assert len(ratios) == 2 and (ratios < 1).all()


def test_looser_outlines_hold_more_pixels_below_half_contrast():
    shape, centre = (80, 80), (40, 40)
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    image = (20 + 200 * np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) / (2 * 7.0**2))).astype(np.uint8)
    tight, loose = (_disc(shape, centre, radius).astype(np.int32) for radius in (8, 13))
    assert below_half_contrast(image, loose)[0] > below_half_contrast(image, tight)[0] + 0.2


def test_labelled_pairs_match_each_image_with_its_labels_and_name_a_missing_one(tmp_path):
    import pytest

    from benchmarks.error_sources import labelled_pairs

    for folder in ("images", "labels"):
        (tmp_path / folder).mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"")
        (tmp_path / "labels" / name).write_bytes(b"")
    assert labelled_pairs(tmp_path) == [(tmp_path / "images" / n, tmp_path / "labels" / n) for n in ("a.png", "b.png")]
    (tmp_path / "labels" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        labelled_pairs(tmp_path)
