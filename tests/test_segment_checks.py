"""How cellseg/segment.py checks the pixels of the images it segments: NaN and infinite pixels
refused naming the image, each image's pixels scanned once on its way to the model."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

import cellseg.formats
import cellseg.infer
import cellseg.io
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.segment import model_record, segment_arrays, segment_images
from cellseg.store import ResultStore


@pytest.fixture(scope="module")
def tiny_predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(str(tiny_checkpoint), PredictConfig(device="cpu", batch_size=4))


def float_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((48, 40)).astype(np.float32)


def test_a_microscopy_planes_nan_pixels_are_refused_naming_its_file_not_its_place_in_a_batch(tmp_path, tiny_predictor):
    """A bare zarr array holding NaN was recorded under its id with the error 'image 0: ...'."""
    tifffile.imwrite(tmp_path / "good.tif", float_image())
    with_nan = float_image(1)
    with_nan[5, 6] = np.nan
    zarr.create_array(str(tmp_path / "bad.zarr"), shape=with_nan.shape, chunks=with_nan.shape, dtype="float32",
                      dimension_names=("y", "x"))[:] = with_nan
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    todo = [("good", str(tmp_path / "good.tif")), ("bad", str(tmp_path / "bad.zarr"))]

    report = segment_images(todo, store, tiny_predictor, model_record(tiny_predictor, "tiny/best.pt"))

    assert report.done == ["good"]
    assert [failure["image_id"] for failure in report.failed] == ["bad"]
    assert report.failed[0]["error"] == (f"ImageReadError: '{tmp_path / 'bad.zarr'}': 1 of 1920 pixels are NaN or "
                                         "infinite; expected finite intensities")


@pytest.fixture()
def scans(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the float images whose pixels were scanned for NaN and infinite values, in order."""
    real = cellseg.io.float_pixel_problem
    seen: list[tuple[int, ...]] = []

    def counted(array: np.ndarray) -> str | None:
        if array.dtype.kind == "f":
            seen.append(array.shape)
        return real(array)

    for module in (cellseg.io, cellseg.infer, cellseg.formats):
        monkeypatch.setattr(module, "float_pixel_problem", counted)
    return seen


def test_each_path_scans_a_float_images_pixels_once(tmp_path, tiny_predictor, scans):
    """They were scanned when read and again in `cell_maps`; `segment_arrays` scanned its arrays
    before `cell_maps` scanned them again."""
    image = float_image()

    segment_arrays(tiny_predictor, [image])
    assert scans == [image.shape]

    scans.clear()
    tifffile.imwrite(tmp_path / "one.tif", image)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    report = segment_images([("one", str(tmp_path / "one.tif"))], store, tiny_predictor,
                            model_record(tiny_predictor, "tiny/best.pt"))
    assert report.done == ["one"] and scans == [image.shape]

    scans.clear()
    tiny_predictor.cell_maps([image])
    assert scans == [image.shape]


def test_arrays_given_to_segment_arrays_or_cell_maps_are_still_refused_for_nan_naming_their_place(tiny_predictor):
    with_inf = float_image()
    with_inf[0, 0] = np.inf

    for segment in (lambda images: segment_arrays(tiny_predictor, images), tiny_predictor.cell_maps):
        with pytest.raises(ValueError, match=r"^image 1: 1 of 1920 pixels are NaN or infinite"):
            segment([float_image(), with_inf])
