"""Mistakes a newcomer makes in a first hour with the README, each answered in one line."""

from pathlib import Path

import pytest

from tests.conftest import cellseg


@pytest.mark.parametrize("given", ["images", "masks", "masks from the images"])
def test_train_given_one_file_names_the_folder_to_give(synthetic_dataset: Path, tmp_path: Path, given: str):
    """`--masks images/a.png` (a file of the images folder) said "mask … holds the same pixels as its
    image: are the masks the image folder?", as if the folder had been given."""
    folders = {"images": synthetic_dataset / "images", "masks": synthetic_dataset / "labels"}
    if given == "masks from the images":
        given, folders["masks"] = "masks", folders["images"]
    one_file = folders[given] / "synth_0000.png"
    urls = {**folders, given: one_file}

    result = cellseg("train", "--images", str(urls["images"]), "--masks", str(urls["masks"]),
                     "--out", str(tmp_path / "run"), check=False)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cellseg train: error: the {given} URL '{one_file}' names one file: training reads a folder of "
        f"{given}, so name its folder ('{folders[given]}')")
    assert not (tmp_path / "run").exists()


def test_ingest_given_one_file_names_the_folder_to_give(synthetic_dataset: Path, tmp_path: Path):
    """The flows (train-unet, tune-unet) pair through ingest, and say the same."""
    from cellseg.dataset_errors import DatasetError
    from cellseg.ingest import ingest_dataset

    one_file = synthetic_dataset / "images" / "synth_0000.png"
    with pytest.raises(DatasetError, match=r"the images URL '.*synth_0000\.png' names one file: .* name its folder"):
        ingest_dataset(str(one_file), str(synthetic_dataset / "labels"), tmp_path / "cache")
