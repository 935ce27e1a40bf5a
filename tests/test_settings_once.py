"""The warning of a settings file that is not read (`cellseg.toml` in the current folder, not named):
once per file in a process, though a flow run loads the settings in the flow and in its tasks."""

from __future__ import annotations

import shutil

import pytest

from cellseg.jobs import SegmentJob
from cellseg.settings import load_settings
from tests.test_listing_masks import logged

NOT_READ = "in this folder is not read"


def test_an_unnamed_settings_file_is_warned_of_once_per_file(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / "cellseg.toml").write_text("[training]\nepochs = 80\n")

    with logged("cellseg.settings") as logs:
        monkeypatch.chdir(first)
        for _ in range(3):
            assert load_settings().training.epochs == 60
        monkeypatch.chdir(second)
        load_settings()
        load_settings()

    assert logs.getvalue().splitlines() == [
        f"cellseg.toml in this folder is not read: name it with --config cellseg.toml or "
        f"CELLSEG_CONFIG={folder / 'cellseg.toml'}" for folder in (first, second)]


@pytest.mark.integration
def test_a_flow_run_warns_once_of_an_unnamed_settings_file(prefect_harness, tmp_path, monkeypatch, synthetic_dataset,
                                                           tiny_checkpoint):
    from cellseg.flows.segment import segment_images_flow

    images = tmp_path / "images"
    images.mkdir()
    for name in ("synth_0000.png", "synth_0001.png"):
        shutil.copy(synthetic_dataset / "images" / name, images / name)
    (tmp_path / "cellseg.toml").write_text("[predict]\nbatch_size = 4\n")
    monkeypatch.chdir(tmp_path)

    with logged("cellseg.settings") as logs:
        summary = segment_images_flow(SegmentJob(source_url=str(images), store_url=str(tmp_path / "results.zarr"),
                                                 checkpoint_url=str(tiny_checkpoint)))

    assert summary["done"] == 2
    assert [line for line in logs.getvalue().splitlines() if NOT_READ in line] == [
        f"cellseg.toml in this folder is not read: name it with --config cellseg.toml or "
        f"CELLSEG_CONFIG={tmp_path / 'cellseg.toml'}"]
