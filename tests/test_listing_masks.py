"""Masks kept beside their images (Cellpose's layout) in a folder to segment: listed as images,
with one warning saying so, by `cellseg predict` and the segment-images flow alike."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cellseg.config import SelectionConfig
from cellseg.formats import list_sources
from cellseg.jobs import SegmentJob
from tests.conftest import cellseg

WARNING_TAIL = "keep masks in a folder of their own"


@contextmanager
def logged(name: str) -> Iterator[io.StringIO]:
    """The records of logger `name` (and those below it) meanwhile, one line each."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield text
    finally:
        logger.removeHandler(handler)


def _cellpose_folder(root: Path, synthetic_dataset: Path) -> Path:
    """Two images, each with its mask beside it (`_masks`, `_cp_masks`), and a third image whose own
    name ends in `_label` with no image of that base name beside it."""
    folder = root / "cellpose"
    folder.mkdir()
    images, masks = synthetic_dataset / "images", synthetic_dataset / "masks"
    shutil.copy(images / "synth_0000.png", folder / "img01.png")
    shutil.copy(masks / "synth_0000.png", folder / "img01_masks.png")
    shutil.copy(images / "synth_0001.png", folder / "img02.png")
    shutil.copy(masks / "synth_0001.png", folder / "img02_cp_masks.png")
    shutil.copy(images / "synth_0002.png", folder / "plate_label.png")
    return folder


def test_listing_a_folder_with_masks_beside_their_images_warns_once(tmp_path, synthetic_dataset):
    folder = _cellpose_folder(tmp_path, synthetic_dataset)

    with logged("cellseg") as logs:
        sources = list_sources(str(folder), SelectionConfig())

    assert [Path(url).name for url in sources] == ["img01.png", "img01_masks.png", "img02.png", "img02_cp_masks.png",
                                                   "plate_label.png"]
    assert logs.getvalue().splitlines() == [
        f"2 files under '{folder}' are named like masks (img01_masks.png, …): they are segmented as images too; "
        f"{WARNING_TAIL}"]


def test_an_image_named_like_a_mask_without_its_base_image_is_not_warned_about(tmp_path, synthetic_dataset):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(synthetic_dataset / "images" / "synth_0000.png", folder / "cells_label.png")
    shutil.copy(synthetic_dataset / "images" / "synth_0001.png", folder / "other.png")
    shutil.copy(synthetic_dataset / "masks" / "synth_0001.png", folder / "other_mask.png")

    with logged("cellseg") as logs:
        list_sources(str(folder), SelectionConfig())

    assert logs.getvalue().splitlines() == [
        f"1 file under '{folder}' is named like a mask (other_mask.png): it is segmented as an image too; "
        f"{WARNING_TAIL}"]
    (folder / "other_mask.png").unlink()
    with logged("cellseg") as logs:
        list_sources(str(folder), SelectionConfig())
    assert logs.getvalue() == ""


def test_predict_warns_once_of_masks_beside_the_images(tmp_path, synthetic_dataset, tiny_checkpoint):
    folder = _cellpose_folder(tmp_path, synthetic_dataset)

    predicted = cellseg("predict", "--model", str(tiny_checkpoint), "--images", str(folder), "--out",
                        str(tmp_path / "results.zarr"))

    warned = [line for line in predicted.stderr.splitlines() if WARNING_TAIL in line]
    assert len(warned) == 1, predicted.stderr
    assert f"2 files under '{folder}' are named like masks (img01_masks.png, …)" in warned[0]
    assert predicted.stdout.startswith("segmented 5, ")


@pytest.mark.integration
def test_segment_images_flow_warns_once_of_masks_beside_the_images(prefect_harness, tmp_path, synthetic_dataset,
                                                                   tiny_checkpoint):
    from cellseg.flows.segment import segment_images_flow

    folder = _cellpose_folder(tmp_path, synthetic_dataset)
    with logged("cellseg") as logs:
        summary = segment_images_flow(SegmentJob(source_url=str(folder), store_url=str(tmp_path / "results.zarr"),
                                                 checkpoint_url=str(tiny_checkpoint)))

    assert summary["done"] == 5
    warned = [line for line in logs.getvalue().splitlines() if WARNING_TAIL in line]
    assert warned == [f"2 files under '{folder}' are named like masks (img01_masks.png, …): they are segmented as "
                      f"images too; {WARNING_TAIL}"]
