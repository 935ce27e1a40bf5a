"""benchmarks.postprocessing_grid: every choice of threshold and centre prominence scored on
labelled images, the checkpoint's own and the best marked."""

import numpy as np
from PIL import Image

from benchmarks.postprocessing_grid import grid_scores, print_table
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor


def _pairs(folder):
    """Two images of bright discs 20 px across, two of them touching, with their labels."""
    folder.mkdir()
    rows, columns = np.ogrid[:96, :96]
    pairs = []
    for index, centres in enumerate([[(30, 30), (30, 49), (70, 60)], [(25, 70), (65, 25), (65, 44)]]):
        labels = np.zeros((96, 96), dtype=np.uint16)
        for number, (row, column) in enumerate(centres, start=1):
            labels[((rows - row) ** 2 + (columns - column) ** 2 <= 100) & (labels == 0)] = number
        image = np.where(labels > 0, 180, 30).astype(np.uint8)
        image += np.random.default_rng(index).integers(0, 25, image.shape, dtype=np.uint8)
        Image.fromarray(image).save(folder / f"i{index}.png")
        Image.fromarray(labels).save(folder / f"l{index}.png")
        pairs.append((folder / f"i{index}.png", folder / f"l{index}.png"))
    return pairs


def test_every_choice_is_scored_and_the_checkpoints_own_is_marked(tmp_path, capsys):
    predictor = Predictor(load_checkpoint(shipped_checkpoint("nuclei")), PredictConfig(device="cpu"))
    result = grid_scores(predictor, _pairs(tmp_path / "d"), thresholds=(0.4, 0.5), prominences=(0.1, 0.2))
    assert result["images"] == 2
    # Split at two prominences per threshold, kept whole once per threshold.
    assert len(result["rows"]) == 2 * 2 + 2
    assert result["own_choice"] == [True, predictor.checkpoint.threshold, predictor.checkpoint.centre_prominence]
    top = max(row["f1_mean"] for row in result["rows"])
    assert top > 0.5  # plain bright discs: the shipped model finds them
    (best,) = [row for row in result["rows"]
               if [row["split_touching"], row["threshold"], row["centre_prominence"]] == result["best_choice"]]
    assert best["f1_mean"] == top
    print_table(result)
    table = capsys.readouterr().out
    assert table.count("\n| ") == 1 + len(result["rows"])  # header and one row per choice
    assert "best" in table
