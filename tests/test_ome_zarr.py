"""The results store as OME-Zarr (NGFF 0.5): read back with ome-zarr-py (what napari-ome-zarr uses)
and validated with ome-zarr-models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg.io import read_image
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError

ome_zarr_reader = pytest.importorskip("ome_zarr.reader")
ome_zarr_io = pytest.importorskip("ome_zarr.io")
v05 = pytest.importorskip("ome_zarr_models.v05")


def _predict(checkpoint: Path, images: Path, store_url: str, *flags: str) -> None:
    cli = str(Path(sys.executable).parent / "cellseg")
    result = subprocess.run([cli, "predict", "--model", str(checkpoint), "--images", str(images), "--out", store_url,
                             *flags], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr


def _nodes(url: str) -> list:
    return list(ome_zarr_reader.Reader(ome_zarr_io.parse_url(url))())


def test_predict_writes_images_with_label_layers_that_ome_zarr_py_reads(tiny_checkpoint, tmp_path):
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=3, bit_depth=16)
    store_url = str(tmp_path / "out.zarr")
    _predict(tiny_checkpoint, tmp_path / "data/images", store_url)
    store = ResultStore.open(store_url, mode="r")
    assert store.done_ids() == {"synth_0000", "synth_0001"}
    for image_id in sorted(store.done_ids()):
        source = read_image(str(tmp_path / f"data/images/{image_id}.png"))
        nodes = _nodes(f"{store_url}/{image_id}")
        image = next(node for node in nodes if node.load(ome_zarr_reader.Multiscales) and not node.load(ome_zarr_reader.Label))
        assert image.metadata["axes"] == [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
        np.testing.assert_array_equal(np.asarray(image.data[0]), source)
        assert image.data[0].dtype == np.uint16  # the source image as read, not a normalised copy
        labels = {node.metadata["name"]: node for node in nodes if node.load(ome_zarr_reader.Label)}
        assert set(labels) == {"cells", "mask"}
        cells = np.asarray(labels["cells"].data[0])
        np.testing.assert_array_equal(cells, store.read_cells(image_id))
        assert cells.max() == store.record(image_id)["statistics"]["cell_count"] > 0
        np.testing.assert_array_equal(np.asarray(labels["mask"].data[0]), store.read_mask(image_id).astype(np.uint8))
        np.testing.assert_array_equal(store.read_image(image_id), source)

        group = zarr.open_group(f"{store_url}/{image_id}", mode="r")
        assert group.attrs["ome"]["version"] == "0.5"
        v05.Image.from_zarr(group)  # raises on any departure from the NGFF 0.5 image schema
        v05.Labels.from_zarr(group["labels"])
        for name in ("cells", "mask"):
            label = v05.ImageLabel.from_zarr(group[f"labels/{name}"])
            assert label.attributes.ome.image_label.source.image == "../../"
        # the per-image statistics and per-cell table stay beside the NGFF data
        assert group.attrs["cellseg"]["status"] == "done"
        _columns, rows = store.read_cell_table(image_id)
        assert len(rows) == cells.max()


def test_labels_only_store_keeps_valid_label_images(tiny_checkpoint, tmp_path):
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=1, size=96, seed=4)
    store_url = str(tmp_path / "labels-only.zarr")
    _predict(tiny_checkpoint, tmp_path / "data/images", store_url, "--no-image")
    store = ResultStore.open(store_url, mode="r")
    group = zarr.open_group(f"{store_url}/synth_0000", mode="r")
    assert "0" not in group and "ome" not in group.attrs
    with pytest.raises(StoreError, match="without a copy of its source image"):
        store.read_image("synth_0000")
    label = v05.ImageLabel.from_zarr(group["labels/cells"])
    assert label.attributes.ome.image_label.source is None
    nodes = _nodes(f"{store_url}/synth_0000/labels")
    data = {node.metadata["name"]: np.asarray(node.data[0]) for node in nodes if node.load(ome_zarr_reader.Label)}
    np.testing.assert_array_equal(data["cells"], store.read_cells("synth_0000"))


def test_replacing_a_result_without_the_image_drops_the_image_metadata(tmp_path):
    store = ResultStore.open(str(tmp_path / "s.zarr"))
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:9] = True
    image = np.arange(600, dtype=np.uint8).reshape(20, 30)
    store.write_result("a", mask, {"cell_count": 1}, "a.png", {"version": "x"}, cells=mask.astype(np.int32), image=image)
    assert "ome" in store.root["a"].attrs
    store.write_result("a", mask, {"cell_count": 1}, "a.png", {"version": "y"}, cells=mask.astype(np.int32))
    assert "ome" not in store.root["a"].attrs and store.record("a")["model"]["version"] == "y"
    with pytest.raises(StoreError, match="shape"):
        store.write_result("b", mask, {}, "b.png", {}, image=image[:10])


def test_the_mask_names_its_colours_for_ome_zarr_py_and_the_labels_show_as_the_reader_chooses(tmp_path):
    """NGFF's image-label SHOULD list `colors`: the mask had none, so a viewer coloured its cells at
    random. Its labels open hidden under the image and shown when opened themselves: that is
    ome-zarr-py's choice (it adds an image's labels invisible), not something the metadata says."""
    store_url = str(tmp_path / "out.zarr")
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    statistics = {"cell_count": 1, "total_cell_area": 4, "mean_cell_area": 4.0, "median_cell_area": 4.0,
                  "foreground_fraction": 0.25, "mean_intensity_inside": 5.0, "mean_intensity_outside": 0.0}
    ResultStore.open(store_url).write_result("a", mask, statistics, "a.png", {"version": "0123456789ab"},
                                             cells=mask.astype(np.int32), image=np.arange(16, dtype=np.uint8).reshape(4, 4))

    under_image = {node.metadata["name"]: node for node in _nodes(f"{store_url}/a") if node.load(ome_zarr_reader.Label)}
    assert under_image["mask"].metadata["color"] == {0: [0.0, 0.0, 0.0, 0.0], 1: [0.0, 1.0, 1.0, 1.0]}
    assert under_image["cells"].metadata["color"] == {}  # one colour per cell is left to the viewer
    assert not under_image["mask"].visible and not under_image["cells"].visible
    alone = _nodes(f"{store_url}/a/labels/mask")
    assert [(node.zarr.basename(), node.visible) for node in alone if node.data] == [
        ("a", False), ("cells", False), ("mask", True)]  # the source image found through `source.image`
    group = zarr.open_group(f"{store_url}/a", mode="r")
    colors = v05.ImageLabel.from_zarr(group["labels/mask"]).attributes.ome.image_label.colors
    assert [(color.label_value, color.rgba) for color in colors] == [(0, (0, 0, 0, 0)), (1, (0, 255, 255, 255))]
