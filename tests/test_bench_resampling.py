"""benchmarks.resampling: SciPy's resampling and the product's timed side by side on a dataset's
images at their cells' scale, and found to agree."""

import numpy as np
import pytest
from PIL import Image

from benchmarks.resampling import bench_resampling, table_rows


def _dataset(folder, diameters):
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rows, columns = np.ogrid[:120, :120]
    for index, diameter in enumerate(diameters):
        labels = np.zeros((120, 120), dtype=np.uint16)
        for number, (row, column) in enumerate([(30, 30), (30, 85), (85, 30), (85, 85)], start=1):
            labels[(rows - row) ** 2 + (columns - column) ** 2 <= (diameter / 2) ** 2] = number
        image = np.where(labels > 0, 200, 20).astype(np.uint8) + np.random.default_rng(index).integers(0, 20, labels.shape, dtype=np.uint8)
        Image.fromarray(image).save(folder / "images" / f"s{index}.png")
        Image.fromarray(labels).save(folder / "labels" / f"s{index}.png")
    return folder


def test_both_ways_resample_the_images_that_need_it_and_agree(tmp_path):
    result = bench_resampling(_dataset(tmp_path / "d", [10, 30, 19]), model_diameter=19.0)
    assert result["images"] == 3
    assert result["resampled_images"] == 2  # cells 10 and 30 across; 19 is the model's size already
    assert result["scipy_ms_per_image"] > 0 and result["opencv_ms_per_image"] > 0
    assert result["largest_difference"] < 1e-6
    assert "faster" in table_rows(result)[0][2]


def test_a_dataset_at_the_model_size_has_nothing_to_time(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs resampling"):
        bench_resampling(_dataset(tmp_path / "d", [19]), model_diameter=19.0)
