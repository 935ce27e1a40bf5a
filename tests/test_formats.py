"""Microscopy formats (cellseg.formats) on files written here by their own libraries: OME-TIFF
(tifffile), OME-Zarr (ome-zarr-py), CZI (pylibCZIrw); channel, z and t chosen; pixel size into
the NGFF metadata and the cell table; the missing-reader error; ND2 and LIF plugin discovery only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from cellseg.config import PredictConfig, SelectionConfig
from cellseg.formats import list_sources, open_plane, read_plane, read_source
from cellseg.formats_bioio import FORMATS_EXTRA, bioio_reader
from cellseg.infer import Predictor
from cellseg.io import ImageReadError, list_image_entries, read_image
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.segment import model_record, segment_images
from cellseg.store import ResultStore

NAMES = ["GFP", "DAPI", "RFP"]
PIXEL_UM = 0.5


def _nuclei(synthetic_dataset: Path) -> np.ndarray:
    """A 96x96 8-bit synthetic image of bright cells, as 16-bit."""
    return read_image(str(synthetic_dataset / "images" / "synth_0000.png")).astype(np.uint16) * 200


def _noise(image: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30000, image.shape).astype(image.dtype)


def write_ome_tiff(path: Path, data: np.ndarray, names: list[str] | None = None, pixel_um: float | None = PIXEL_UM) -> str:
    """A TCZYX OME-TIFF written by tifffile, with channel names and a physical pixel size."""
    metadata: dict = {"axes": "TCZYX"}
    if names:
        metadata["Channel"] = {"Name": names}
    if pixel_um:
        metadata |= {"PhysicalSizeX": pixel_um, "PhysicalSizeY": pixel_um, "PhysicalSizeXUnit": "µm",
                     "PhysicalSizeYUnit": "µm"}
    tifffile.imwrite(path, data, ome=True, metadata=metadata)
    return str(path)


def write_ome_zarr(url: str, data: np.ndarray, names: list[str], pixel_um: float, storage_options=None) -> str:
    """A TCZYX OME-Zarr image written by ome-zarr-py, with channel names and a pixel size in micrometres."""
    from ome_zarr.writer import write_image

    root = zarr.open_group(url, mode="w", storage_options=storage_options)
    window = {"start": 0, "end": 65535, "min": 0, "max": 65535}
    write_image(data, root, axes="tczyx", scale={"y": pixel_um, "x": pixel_um},
                axes_units={"y": "micrometer", "x": "micrometer"}, scale_factors=None,
                omero={"channels": [{"label": name, "color": "FFFFFF", "window": window} for name in names]})
    return url


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(str(tiny_checkpoint), PredictConfig(device="cpu", min_cell_area=20))


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, synthetic_dataset, predictor):
    """The nuclei as a single-channel PNG and as channel 1 of a 3-channel OME-TIFF, each segmented
    into a store of its own: (png store, OME-TIFF store)."""
    root = tmp_path_factory.mktemp("formats")
    nuclei = _nuclei(synthetic_dataset)
    (root / "png").mkdir()
    (root / "ome").mkdir()
    tifffile.imwrite(root / "png" / "cells.tif", nuclei)
    stack = np.stack([_noise(nuclei, 1), nuclei, _noise(nuclei, 2)])[None, :, None]
    write_ome_tiff(root / "ome" / "cells.ome.tif", stack, NAMES)
    stores = []
    for folder, selection in (("png", SelectionConfig()), ("ome", SelectionConfig(channel="DAPI"))):
        store = ResultStore.open(str(root / f"{folder}.zarr"))
        chosen = Predictor(predictor.checkpoint, predictor.config.model_copy(update={"selection": selection}))
        report = segment_images([("cells", url) for url in list_sources(str(root / folder), selection)], store, chosen,
                                model_record(chosen, "tiny"))
        assert report.done == ["cells"], report.failed
        stores.append(store)
    return stores


def test_a_three_channel_image_segments_like_its_nuclear_channel_alone(segmented):
    single, multi = segmented
    assert single.read_cells("cells").max() > 3
    assert np.array_equal(multi.read_cells("cells"), single.read_cells("cells"))
    assert multi.record("cells")["statistics"] == single.record("cells")["statistics"]
    assert multi.record("cells")["source"]["selection"] | {"sizes": None} == {
        "format": "ome-tiff", "channel": 1, "channel_name": "DAPI", "z": 0, "t": 0, "sizes": None}
    assert "source" not in single.record("cells")  # a plain TIFF with no choice keeps today's record


def test_the_pixel_size_lands_in_the_ngff_scale_and_the_cell_table(segmented):
    _, multi = segmented
    for path in ("cells", "cells/labels/cells", "cells/labels/mask"):
        (scales,) = multi.root[path].attrs["ome"]["multiscales"]
        assert scales["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [PIXEL_UM, PIXEL_UM]}]
        assert [axis["unit"] for axis in scales["axes"]] == ["micrometer", "micrometer"]
    columns, rows = multi.read_cell_table("cells")
    area, area_um2 = rows[:, columns.index("area")], rows[:, columns.index("area_um2")]
    assert len(rows) > 3 and np.allclose(area_um2, area * PIXEL_UM**2)
    (row,) = multi.statistics()
    assert row["pixel_size_um"] == PIXEL_UM and row["channel"] == 1
    assert row["total_cell_area_um2"] == pytest.approx(row["total_cell_area"] * PIXEL_UM**2)




@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_channel_of_a_colour_png_or_jpeg_is_its_red_green_or_blue(tmp_path, synthetic_dataset, predictor, suffix):
    """A Fiji RGB composite with the nuclei in blue: without a choice it is luma (blue weighs 11%,
    the other stains the rest), and --channel, which picks a colour of an RGB TIFF, was refused
    for a PNG or JPEG as having one channel."""
    from PIL import Image

    nuclei = (read_image(str(synthetic_dataset / "images" / "synth_0000.png"))).astype(np.uint8)
    composite = np.stack([_noise(nuclei, 1) // 128, _noise(nuclei, 2) // 128, nuclei], axis=-1).astype(np.uint8)
    Image.fromarray(composite).save(tmp_path / f"composite{suffix}", quality=100)
    Image.fromarray(nuclei).save(tmp_path / "nuclei.png")
    url = str(tmp_path / f"composite{suffix}")

    blue, record = read_source(url, SelectionConfig(channel=2))
    assert blue.shape == nuclei.shape and record["selection"]["channel"] == 2
    assert record["selection"]["sizes"] == {"T": 1, "C": 3, "Z": 1}
    if suffix == ".png":
        assert np.array_equal(blue, nuclei) and np.array_equal(read_source(url, SelectionConfig(channel=0))[0],
                                                               composite[..., 0])
    assert np.array_equal(read_source(url, SelectionConfig())[0], read_image(url))  # no choice: luma, as before
    with pytest.raises(ImageReadError, match=r"channel 3 is out of range; its channels are 0 '0', 1 '1', 2 '2'"):
        read_source(url, SelectionConfig(channel=3))
    with pytest.raises(ImageReadError, match=r"channel 1 is out of range; its channels are 0 '0'$"):
        read_source(str(tmp_path / "nuclei.png"), SelectionConfig(channel=1))  # a grey PNG keeps its one channel

    chosen = Predictor(predictor.checkpoint, predictor.config.model_copy(update={"selection": SelectionConfig(channel=2)}))
    stores = {name: ResultStore.open(str(tmp_path / f"{name}.zarr")) for name in ("composite", "nuclei")}
    for name, (store, model) in {"composite": (stores["composite"], chosen), "nuclei": (stores["nuclei"], predictor)}.items():
        source = url if name == "composite" else str(tmp_path / "nuclei.png")
        report = segment_images([("cells", source)], store, model, model_record(model, "tiny"))
        assert report.done == ["cells"], report.failed
    cells = stores["composite"].read_cells("cells")
    if suffix == ".png":
        assert cells.max() > 3 and np.array_equal(cells, stores["nuclei"].read_cells("cells"))
    else:  # JPEG's blue is the nuclei within its rounding
        assert abs(int(cells.max()) - int(stores["nuclei"].read_cells("cells").max())) <= 1

def test_a_cell_table_of_images_with_and_without_a_pixel_size_keeps_every_column(tmp_path, synthetic_dataset,
                                                                                   predictor):
    """Only the cells of an image with a pixel size have area_um2: the table's columns used to be
    the first row's, so CSV refused the others' rows and Parquet dropped area_um2 for all."""
    import csv

    from cellseg.tables import write_table

    nuclei = _nuclei(synthetic_dataset)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a_plain.tif", nuclei)
    write_ome_tiff(tmp_path / "in" / "b_sized.ome.tif", nuclei[None, None, None], ["DAPI"], PIXEL_UM)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    sources = list_sources(str(tmp_path / "in"), SelectionConfig())
    report = segment_images([(Path(url).name.split(".")[0], url) for url in sources], store, predictor,
                            model_record(predictor, "tiny"))
    assert sorted(report.done) == ["a_plain", "b_sized"], report.failed
    count = write_table(store.cell_rows(), str(tmp_path / "cells.csv"))
    with open(tmp_path / "cells.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert count == len(rows) > 6 and "area_um2" in rows[0]
    sized = [row for row in rows if row["image_id"] == "b_sized"]
    assert sized and all(float(row["area_um2"]) == pytest.approx(float(row["area"]) * PIXEL_UM**2) for row in sized)
    assert all(row["area_um2"] == "" for row in rows if row["image_id"] == "a_plain")
    parquet = pytest.importorskip("pyarrow.parquet")
    write_table(store.cell_rows(), str(tmp_path / "cells.parquet"), "parquet")
    table = parquet.read_table(tmp_path / "cells.parquet").to_pylist()
    assert [row["area_um2"] is None for row in table] == [row["image_id"] == "a_plain" for row in table]

def test_z_max_projects_and_z_index_picks_a_plane(tmp_path, synthetic_dataset):
    nuclei = _nuclei(synthetic_dataset)
    left, right = nuclei.copy(), nuclei.copy()
    left[:, 48:] = 0
    right[:, :48] = 0
    url = write_ome_tiff(tmp_path / "stack.ome.tif", np.stack([left, right, left // 2])[None, None])
    image, source = read_source(url, SelectionConfig(z="max"))
    assert np.array_equal(image, nuclei) and source["selection"]["z"] == "max"
    assert np.array_equal(read_source(url, SelectionConfig(z=1))[0], right)



def _write_plain_stack(path: Path, stack: np.ndarray, writer: str) -> str:
    """An (N, H, W) stack as a plain multi-page TIFF without a Z axis: tifffile's shaped series
    (axes QYX) or Pillow's pages (IYX)."""
    if writer == "tifffile":
        tifffile.imwrite(path, stack, photometric="minisblack")  # unsaid, (3, H, W) is planar RGB
    else:
        from PIL import Image

        first, *rest = (Image.fromarray(page) for page in stack)
        first.save(path, save_all=True, append_images=rest)
    return str(path)


@pytest.mark.parametrize(("writer", "axes"), [("tifffile", "QYX"), ("pillow", "IYX")])
def test_z_reads_the_pages_of_a_plain_tiff_stack_as_z_planes(tmp_path, synthetic_dataset, writer, axes):
    nuclei = _nuclei(synthetic_dataset)
    stack = np.stack([nuclei // 2, _noise(nuclei, 1), nuclei])
    url = _write_plain_stack(tmp_path / "stack.tif", stack, writer)
    with tifffile.TiffFile(url) as tif:
        assert tif.series[0].axes == axes
    image, source = read_source(url, SelectionConfig(z="max"))
    assert np.array_equal(image, stack.max(axis=0)) and source["selection"]["sizes"]["Z"] == 3
    assert np.array_equal(read_source(url, SelectionConfig(z=1))[0], stack[1])
    with pytest.raises(ImageReadError) as raised:
        read_source(url, SelectionConfig(z=5))
    assert str(raised.value) == f"'{url}': z 5 is out of range; it has 3 z planes (--z 0..2 or --z max)"


@pytest.mark.parametrize(("writer", "axis"), [("tifffile", "Q"), ("pillow", "I")])
def test_a_plain_tiff_stack_without_z_reads_its_first_page_and_says_how_to_choose(tmp_path, synthetic_dataset,
                                                                                 writer, axis):
    nuclei = _nuclei(synthetic_dataset)
    stack = np.stack([nuclei, _noise(nuclei, 2), nuclei // 2])
    url = _write_plain_stack(tmp_path / "stack.tif", stack, writer)
    warnings: list[str] = []
    image, _ = read_source(url, SelectionConfig(channel=0), warnings=warnings)
    assert np.array_equal(image, stack[0])
    assert warnings == [f"uses index 0 of its {axis} axis (3 planes): choose one with --z 0..2 or project with --z max"]


def test_t_all_makes_one_record_per_time_point(tmp_path, synthetic_dataset, tiny_checkpoint):
    nuclei = _nuclei(synthetic_dataset)
    (tmp_path / "src").mkdir()
    write_ome_tiff(tmp_path / "src" / "movie.ome.tif", np.stack([nuclei, np.zeros_like(nuclei), nuclei])[:, None, None])
    job = SegmentJob(source_url=str(tmp_path / "src"), store_url=str(tmp_path / "out.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=PredictConfig(device="cpu", selection={"t": "all"}))
    report = run_segmentation(job)
    assert report.done == ["movie_t000", "movie_t001", "movie_t002"] and not report.failed
    store = ResultStore.open(job.store_url, mode="r")
    assert [store.record(i)["source"]["selection"]["t"] for i in report.done] == [0, 1, 2]
    assert store.read_cells("movie_t000").max() > 3 and store.read_cells("movie_t001").max() == 0
    assert np.array_equal(store.read_cells("movie_t002"), store.read_cells("movie_t000"))
    assert store.record("movie_t002")["model"]["predict"]["selection"] == {"channel": None, "z": None, "t": "all",
                                                                       "recursive": False}


@pytest.mark.parametrize(("selection", "expected"), [
    (SelectionConfig(), "has 3 channels (0 'GFP', 1 'DAPI', 2 'RFP'): choose one with --channel INDEX or NAME"),
    (SelectionConfig(channel="Hoechst"), "no channel named 'Hoechst'; its channels are 0 'GFP', 1 'DAPI', 2 'RFP'"),
    (SelectionConfig(channel=3), "channel 3 is out of range; its channels are 0 'GFP', 1 'DAPI', 2 'RFP'"),
    (SelectionConfig(channel=0, z=4), "z 4 is out of range; it has 2 z planes (--z 0..1 or --z max)"),
    (SelectionConfig(channel=0, z=0), "has 2 time points: choose one with --t 0..1 or every one with --t all"),
    (SelectionConfig(channel=0, z=0, t=2), "time point 2 is out of range; it has 2 (--t 0..1 or --t all)"),
])
def test_a_choice_the_file_lacks_is_one_line_naming_the_file_and_its_choices(tmp_path, selection, expected):
    url = write_ome_tiff(tmp_path / "x.ome.tif", np.zeros((2, 3, 2, 8, 8), np.uint16), NAMES)
    with pytest.raises(ImageReadError) as raised:
        read_source(url, selection)
    assert str(raised.value) in (f"'{url}' {expected}", f"'{url}': {expected}")


def test_a_single_plane_image_refuses_a_channel_it_does_not_have(tmp_path, synthetic_dataset):
    png = str(synthetic_dataset / "images" / "synth_0000.png")
    assert np.array_equal(read_source(png, SelectionConfig(channel=0, z="max", t="all"))[0], read_image(png))
    with pytest.raises(ImageReadError, match=r"synth_0000.png': no channel named 'DAPI'; its channels are 0 '0'$"):
        read_source(png, SelectionConfig(channel="DAPI"))


def test_an_ome_tiff_named_plain_tif_says_how_to_choose_its_plane(tmp_path):
    url = write_ome_tiff(tmp_path / "x.tif", np.zeros((1, 3, 1, 8, 8), np.uint16), NAMES)
    warnings: list[str] = []
    read_source(url, SelectionConfig(), warnings=warnings)
    assert warnings == ["uses page 0 of 3: the other pages are not segmented; it is an OME-TIFF: name it *.ome.tif "
                        "to choose a channel, z plane or time point"]


def test_a_cell_diameter_in_um_is_converted_with_the_pixel_size(tmp_path, synthetic_dataset):
    from cellseg.bundled import shipped_checkpoint
    from cellseg.checkpoint import load_checkpoint

    nuclei = _nuclei(synthetic_dataset)
    ome = write_ome_tiff(tmp_path / "a.ome.tif", nuclei[None, None, None])
    plain = str(tmp_path / "b.tif")
    tifffile.imwrite(plain, nuclei)
    model = load_checkpoint(shipped_checkpoint("nuclei"))  # a model at a cell size: the diameter is used
    predictor = Predictor(model, PredictConfig(device="cpu", cell_diameter_um=9.0))
    store = ResultStore.open(str(tmp_path / "out.zarr"))
    report = segment_images([("a", ome), ("b", plain)], store, predictor, model_record(predictor, "nuclei"))
    assert report.done == ["a"]
    assert store.record("a")["scale"]["cell_diameter"] == pytest.approx(9.0 / PIXEL_UM)
    assert report.failed[0]["error"] == (f"ImageReadError: '{plain}': its metadata gives no pixel size, so a cell "
                                         "diameter in µm (9) cannot be converted to pixels; give --cell-diameter in pixels")


def test_plane_reads_regions_lazily_from_tiled_bigtiff_and_zarr_arrays(tmp_path):
    data = np.arange(3 * 300 * 500, dtype=np.uint16).reshape(3, 300, 500)
    tifffile.imwrite(tmp_path / "big.tif", data, bigtiff=True, tile=(128, 128), metadata={"axes": "CYX"})
    with open_plane(str(tmp_path / "big.tif"), SelectionConfig(channel=2)) as plane:
        assert plane.shape == (300, 500) and plane.dtype == np.uint16 and plane.pixel_size_um is None
        assert np.array_equal(plane[130:140, 250:499], data[2, 130:140, 250:499])
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 300, 500), chunks=(1, 64, 64), dtype="uint16",
                              dimension_names=("z", "y", "x"))
    array[...] = data[:2]
    plane = open_plane(str(tmp_path / "a.zarr"), SelectionConfig(z="max"))
    assert np.array_equal(plane[10:20, 0:64], data[:2, 10:20, 0:64].max(0)) and plane.selection["format"] == "zarr"


def test_read_plane_refuses_a_plane_over_max_pixels_before_decoding(tmp_path):
    url = write_ome_tiff(tmp_path / "x.ome.tif", np.zeros((1, 1, 1, 64, 64), np.uint16))
    with pytest.raises(ImageReadError, match="4096 pixels exceeds the limit of 4000"):
        read_plane(url, SelectionConfig(), max_pixels=4000)
    hostile = zarr.create_array(str(tmp_path / "h.zarr"), shape=(8, 8), chunks=(4096, 4096), dtype="uint16")
    hostile[...] = 1  # an 8x8 image whose one chunk would decode to 32 MiB
    with pytest.raises(ImageReadError, match="one chunk decodes to 33554432 bytes, over the limit of 8000000"):
        read_plane(str(tmp_path / "h.zarr"), SelectionConfig(), max_pixels=1_000_000)


def test_ome_zarr_images_are_read_with_their_names_and_pixel_size(tmp_path, synthetic_dataset):
    pytest.importorskip("bioio_ome_zarr")
    nuclei = _nuclei(synthetic_dataset)
    data = np.stack([_noise(nuclei, 3), nuclei])[None, :, None]
    url = write_ome_zarr(str(tmp_path / "src" / "img.ome.zarr"), data, ["GFP", "DAPI"], 0.25)
    (tmp_path / "src" / "img.ome.zarr" / "stray.txt").write_text("inside the image: never listed")
    assert list_sources(str(tmp_path / "src"), SelectionConfig()) == [url]
    with open_plane(url, SelectionConfig(channel="DAPI")) as plane:
        assert plane.pixel_size_um == 0.25 and plane.selection["channel"] == 1
        assert np.array_equal(plane[10:30, 40:90], nuclei[10:30, 40:90])


def test_a_zarr_folder_named_as_the_source_is_one_image_and_a_results_store_is_refused(tmp_path, synthetic_dataset,
                                                                                      tiny_checkpoint):
    nuclei = _nuclei(synthetic_dataset)
    bare = zarr.create_array(str(tmp_path / "bare.zarr"), shape=nuclei.shape, chunks=(32, 32), dtype=nuclei.dtype,
                             dimension_names=("y", "x"))
    bare[...] = nuclei
    assert list_sources(str(tmp_path / "bare.zarr"), SelectionConfig()) == [str(tmp_path / "bare.zarr")]
    job = SegmentJob(source_url=str(tmp_path / "bare.zarr"), store_url=str(tmp_path / "out.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=PredictConfig(device="cpu"))
    report = run_segmentation(job)  # it listed the array's chunks, found no image and did nothing
    assert report.done == ["bare"] and not report.failed
    assert ResultStore.open(job.store_url, mode="r").read_cells("bare").max() > 3
    for store_or_image in (job.store_url, f"{job.store_url}/bare"):
        with pytest.raises(ValueError, match=r"\.zarr(/bare)?' is a cellseg results store \(or one image of one\), "
                                             "not images: name the folder that"):
            list_sources(store_or_image, SelectionConfig())
    (tmp_path / "bare.zarr").rename(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"bare' is a zarr store whose name does not end in \.zarr: name it so"):
        list_sources(str(tmp_path / "bare"), SelectionConfig())
    with pytest.raises(ValueError, match=r"mask folder '.*bare' is a zarr store, not a folder of mask files"):
        list_image_entries(str(tmp_path / "bare"), kind="mask")


@pytest.mark.integration
def test_ome_zarr_on_s3_is_one_image(s3_bucket, synthetic_dataset):
    pytest.importorskip("bioio_ome_zarr")
    bucket, options = s3_bucket
    nuclei = _nuclei(synthetic_dataset)
    url = write_ome_zarr(f"{bucket}/src/plate1.ome.zarr", nuclei[None, None, None], ["DAPI"], 0.5, options)
    assert list_sources(f"{bucket}/src", SelectionConfig(), options) == [url]
    image, source = read_source(url, SelectionConfig(channel="DAPI"), options)
    assert np.array_equal(image, nuclei) and source["pixel_size_um"] == 0.5


def test_czi_written_by_pylibczirw_reads_its_channel_and_pixel_size(tmp_path, synthetic_dataset):
    pyczi = pytest.importorskip("pylibCZIrw.czi")
    pytest.importorskip("bioio_czi")
    nuclei = _nuclei(synthetic_dataset)
    path = str(tmp_path / "a.czi")
    with pyczi.create_czi(path, exist_ok=True) as writer:
        for channel, plane in enumerate((_noise(nuclei, 4), nuclei)):
            writer.write(data=plane, plane={"C": channel, "Z": 0, "T": 0}, location=(0, 0))
        writer.write_metadata(document_name="test", channel_names={0: "GFP", 1: "DAPI"}, scale_x=0.5e-6, scale_y=0.5e-6)
    image, source = read_source(path, SelectionConfig(channel="DAPI"))
    assert np.array_equal(image, nuclei)
    assert source["pixel_size_um"] == pytest.approx(0.5) and source["selection"]["format"] == "czi"


@pytest.mark.parametrize("suffix", [".nd2", ".lif"])
def test_nd2_and_lif_plugins_are_found_and_refuse_a_damaged_file_in_one_line(tmp_path, suffix):
    """No writer exists for ND2 or LIF: their readers are untested on real files."""
    plugin = "bioio-" + suffix[1:]
    pytest.importorskip(plugin.replace("-", "_"))
    assert bioio_reader(plugin, "x").__module__.startswith(plugin.replace("-", "_"))
    damaged = tmp_path / f"a{suffix}"
    damaged.write_bytes(b"\x00not a microscope file" * 10)
    with pytest.raises(ImageReadError) as raised:
        read_source(str(damaged), SelectionConfig())
    assert str(raised.value).startswith(f"'{damaged}': {plugin} cannot read it") and "\n" not in str(raised.value)


@pytest.mark.integration
def test_a_missing_plugin_is_one_line_naming_the_extra_and_the_file(tmp_path, tiny_checkpoint):
    """The plugin is not importable in the subprocess (as when the extra is not installed)."""
    (tmp_path / "src").mkdir()
    czi = tmp_path / "src" / "a.czi"
    czi.write_bytes(b"ZISRAWFILE")
    run = ("import sys; sys.modules['bioio_czi'] = None; from cellseg.cli import main; "
           f"sys.exit(main(['predict', '--model', {str(tiny_checkpoint)!r}, '--images', {str(tmp_path / 'src')!r}, "
           f"'--out', {str(tmp_path / 'out.zarr')!r}, '--device', 'cpu']))")
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 3, result.stderr
    line = f"  failed: {czi}: MissingReaderError: '{czi}' needs the bioio-czi reader, which is not installed: {FORMATS_EXTRA}"
    assert line in result.stdout.splitlines()


@pytest.mark.integration
def test_plain_images_never_import_bioio_or_dask(synthetic_dataset):
    png = str(synthetic_dataset / "images" / "synth_0000.png")
    run = ("import sys; from cellseg.config import SelectionConfig; from cellseg.formats import read_source; "
           f"image, source = read_source({png!r}, SelectionConfig()); "
           "print(image.shape, source, sorted({m.split('.')[0] for m in sys.modules} & {'bioio', 'dask', 'xarray'}))")
    result = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "(96, 96) {} []"


def test_selection_flags_fill_the_predict_config(tmp_path):
    from cellseg.cli_parser import build_parser
    from cellseg.cli_settings import command_settings

    args = build_parser().parse_args(["predict", "--images", "in", "--out", "o.zarr", "--channel", "DAPI", "--z", "max",
                                      "--t", "all", "--cell-diameter-um", "7.5"])
    predict = command_settings(args).predict
    assert predict.selection == SelectionConfig(channel="DAPI", z="max", t="all") and predict.cell_diameter_um == 7.5
    index = command_settings(build_parser().parse_args(["predict", "--images", "in", "--out", "o.zarr", "--channel", "1"]))
    assert index.predict.selection.channel == 1
    assert json.loads(PredictConfig(selection={"z": 3}).model_dump_json())["selection"] == {"channel": None, "z": 3, "t": None,
                                                                                          "recursive": False}


def test_a_plane_without_a_pixel_size_records_both_sizes_as_null(tmp_path, synthetic_dataset):
    url = str(tmp_path / "plain.tif")
    tifffile.imwrite(url, _nuclei(synthetic_dataset))
    _, source = read_source(url, SelectionConfig(channel=0))
    assert source["pixel_size_um"] is None and source["pixel_size_yx_um"] is None
    _, source = read_source(write_ome_tiff(tmp_path / "a.ome.tif", np.zeros((1, 1, 1, 8, 8), np.uint16)), SelectionConfig())
    assert source["pixel_size_um"] == PIXEL_UM and source["pixel_size_yx_um"] == [PIXEL_UM, PIXEL_UM]


@pytest.mark.parametrize(("size", "unit"), [(0.5, "µm"), (0.5, "\u03bcm"), (500, "nm"), (5000, "\u212b"), (0.5, "micron")])
def test_ome_tiff_pixel_sizes_are_read_in_micrometres_whatever_the_unit_is_spelt(tmp_path, size, unit):
    url = str(tmp_path / "a.ome.tif")
    tifffile.imwrite(url, np.zeros((8, 8), np.uint16), ome=True, metadata={
        "axes": "YX", "PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit})
    _, source = read_source(url, SelectionConfig())
    assert source["pixel_size_um"] == pytest.approx(0.5) and source["pixel_size_yx_um"] == pytest.approx([0.5, 0.5])


def test_an_ome_tiff_pixel_size_in_an_unknown_unit_is_left_out_with_a_warning(tmp_path, caplog):
    url = str(tmp_path / "a.ome.tif")
    tifffile.imwrite(url, np.zeros((8, 8), np.uint16), ome=True, metadata={
        "axes": "YX", "PhysicalSizeX": 2, "PhysicalSizeY": 2, "PhysicalSizeXUnit": "pixel", "PhysicalSizeYUnit": "pixel"})
    _, source = read_source(url, SelectionConfig())
    assert source["pixel_size_um"] is None
    assert "PhysicalSizeY is in 'pixel', not a unit of length cellseg knows: no pixel size" in caplog.text


def _write_imagej_hyperstack(path: Path, nuclei: np.ndarray) -> tuple[str, np.ndarray]:
    """A Fiji-style ZCYX hyperstack, 3 z planes of 2 channels (noise, then nuclei brighter with z),
    calibrated at 0.25 x 0.2 µm (y x) with the unit written as ImageJ writes µ."""
    stack = np.stack([np.stack([_noise(nuclei, z), nuclei // (3 - z)]) for z in range(3)])
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / 0.2, 1 / 0.25),
                     metadata={"axes": "ZCYX", "unit": "\\u00B5m"})
    return str(path), stack


def test_an_imagej_hyperstack_without_a_choice_is_refused_not_read_as_its_first_page(tmp_path, synthetic_dataset):
    url, stack = _write_imagej_hyperstack(tmp_path / "fiji.tif", _nuclei(synthetic_dataset))
    with pytest.raises(ImageReadError) as raised:
        read_source(url, SelectionConfig())  # page 0 is channel 0 (noise) of z 0
    assert str(raised.value) == f"'{url}' has 2 channels (0 '0', 1 '1'): choose one with --channel INDEX or NAME"
    image, source = read_source(url, SelectionConfig(channel=1, z="max"))
    assert np.array_equal(image, stack[:, 1].max(axis=0))
    assert source["selection"]["sizes"] == {"T": 1, "C": 2, "Z": 3}
    assert source["pixel_size_yx_um"] == pytest.approx([0.25, 0.2])
    assert source["pixel_size_um"] == pytest.approx(np.sqrt(0.25 * 0.2))


def test_a_single_plane_fiji_tiff_read_without_a_choice_keeps_its_calibration(tmp_path, synthetic_dataset,
                                                                              tiny_checkpoint, caplog):
    nuclei = _nuclei(synthetic_dataset)
    (tmp_path / "src").mkdir()
    tifffile.imwrite(tmp_path / "src" / "fiji.tif", nuclei, imagej=True, resolution=(1 / 0.5, 1 / 0.4),
                     metadata={"unit": "\\u00B5m"})
    image, source = read_source(str(tmp_path / "src" / "fiji.tif"), SelectionConfig(), warnings=(warnings := []))
    assert np.array_equal(image, nuclei)
    assert source == {"pixel_size_um": pytest.approx(np.sqrt(0.5 * 0.4)), "pixel_size_yx_um": pytest.approx([0.4, 0.5])}
    assert warnings == ["pixels are 0.4 x 0.5 µm (y x): areas in µm² use both, cell sizes their geometric mean"]
    tifffile.imwrite(tmp_path / "src" / "plain.tif", nuclei)
    assert read_source(str(tmp_path / "src" / "plain.tif"), SelectionConfig())[1] == {}
    # A cell size in µm turns into pixels by it, where the image used to fail for want of one.
    job = SegmentJob(source_url=str(tmp_path / "src" / "fiji.tif"), store_url=str(tmp_path / "out.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=PredictConfig(device="cpu", cell_diameter_um=4.0))
    report = run_segmentation(job)
    assert report.done == ["fiji"] and not report.failed
    store = ResultStore.open(job.store_url, mode="r")
    assert store.record("fiji")["source"]["pixel_size_yx_um"] == pytest.approx([0.4, 0.5])
    (row,) = store.statistics()
    assert row["pixel_size_um"] == pytest.approx(np.sqrt(0.5 * 0.4)) and row["cell_count"] > 0
    columns, rows = store.read_cell_table("fiji")
    assert np.allclose(rows[:, columns.index("area_um2")], rows[:, columns.index("area")] * 0.4 * 0.5)


def test_an_imagej_time_series_without_a_choice_is_refused(tmp_path):
    url = str(tmp_path / "movie.tif")
    tifffile.imwrite(url, np.zeros((3, 8, 8), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ImageReadError, match=r"has 3 time points: choose one with --t 0\.\.2 or every one with --t all$"):
        read_source(url, SelectionConfig())


def test_a_channel_on_a_plain_stack_says_its_pages_are_z_planes(tmp_path, synthetic_dataset):
    nuclei = _nuclei(synthetic_dataset)
    url = _write_plain_stack(tmp_path / "two.tif", np.stack([_noise(nuclei, 1), nuclei]), "tifffile")
    with pytest.raises(ImageReadError) as raised:
        read_source(url, SelectionConfig(channel=1))
    assert str(raised.value) == (f"'{url}': no channel 1: it has no channel axis, and its 2 pages are read as z planes "
                                 "(--z 0..1 picks one, --z max projects them)")
    assert np.array_equal(read_source(url, SelectionConfig(z=1))[0], nuclei)


def test_a_damaged_tiff_is_refused_in_one_line_read_lazily_or_whole(tmp_path):
    path = tmp_path / "damaged.tif"
    path.write_bytes(b"II*\x00" + (1 << 30).to_bytes(4, "little") + bytes(64))  # its first IFD past the end
    expected = rf"^'{re.escape(str(path))}': not a readable TIFF \(\w+: .+\)$"
    with pytest.raises(ImageReadError, match=expected):
        open_plane(str(path), SelectionConfig())
    with pytest.raises(ImageReadError, match=expected):
        read_plane(str(path), SelectionConfig())


def test_a_zarr_group_whose_metadata_names_a_plate_is_a_plate_when_listed_and_when_read(tmp_path, caplog):
    # Listing took a group for a plate only when its `plate` metadata was a mapping, reading it
    # whenever it had `plate` metadata: a malformed plate was listed as one image, which reading
    # then refused as a plate to list from its folder. Both follow NGFF now: `plate` makes a
    # plate, and listing skips one whose metadata it cannot read, saying why.
    (tmp_path / "src").mkdir()
    zarr.open_group(str(tmp_path / "src" / "broken.zarr"), mode="w").attrs["ome"] = {"version": "0.5", "plate": ["A"]}
    assert list_sources(str(tmp_path / "src"), SelectionConfig()) == []
    assert "skipping the plate" in caplog.text and "its plate metadata is list, expected a mapping" in caplog.text
    with pytest.raises(ImageReadError, match="is an HCS plate: give the folder holding it"):
        read_source(str(tmp_path / "src" / "broken.zarr"), SelectionConfig())


def _tiff_of_one_page(path: Path, height: int, width: int, rows_per_strip: int, strips: list[bytes],
                      compression: int = 8) -> Path:
    """A uint8 TIFF (deflate-compressed by default) written byte by byte: a header may declare what
    its data is not."""
    import struct

    offsets, position = [], 8 + 2 + 12 * 9 + 4 + 8 * len(strips) * 2
    for strip in strips:
        offsets.append(position)
        position += len(strip)
    arrays = 8 + 2 + 12 * 9 + 4
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, compression), (262, 3, 1, 1),
            (273, 4, len(strips), offsets[0] if len(strips) == 1 else arrays), (277, 3, 1, 1),
            (278, 4, 1, rows_per_strip),
            (279, 4, len(strips), len(strips[0]) if len(strips) == 1 else arrays + 4 * len(strips))]
    header = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    header += b"".join(struct.pack("<HHII", *tag) for tag in tags) + struct.pack("<I", 0)
    header += struct.pack(f"<{len(strips)}I", *offsets) + struct.pack(f"<{len(strips)}I", *map(len, strips))
    header = header.ljust(offsets[0], b"\x00")
    path.write_bytes(header + b"".join(strips))
    return path


def test_a_tiff_read_block_by_block_is_refused_for_a_huge_strip_and_a_strip_of_another_size_is_one_line(tmp_path):
    """Read block by block, a TIFF's tiles and strips were not bounded: a 43 MB file holding one
    100000 x 100000 strip took 10 GB, and a strip inflating to fewer bytes than declared ended in
    tifffile's TiffFileError instead of a line naming the file."""
    import zlib

    huge = _tiff_of_one_page(tmp_path / "huge.tif", 100_000, 100_000, 100_000, [zlib.compress(b"\x00" * 1000)])
    with pytest.raises(ImageReadError, match=r"'.*huge.tif': one tile or strip \(100000 x 100000 uint8 samples\) "
                                             r"takes 10000000000 bytes, over the 256 MiB"):
        open_plane(str(huge), SelectionConfig())

    # An uncompressed strip takes what the file holds, not what a header claims: such TIFFs (ImageJ's)
    # still go block by block
    flat = _tiff_of_one_page(tmp_path / "flat.tif", 20_000, 20_000, 20_000, [b"\x00" * 1000], compression=1)
    assert open_plane(str(flat), SelectionConfig()).shape == (20_000, 20_000)
    # Too large to read whole as well: the block path takes it, and says why it cannot
    source = tmp_path / "source"
    source.mkdir()
    huge.rename(source / "huge.tif")
    run = subprocess.run([str(Path(sys.executable).parent / "cellseg"), "predict", "--model-version", "general",
                          "--images", str(source), "--out", str(tmp_path / "r.zarr")], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 3 and "Traceback" not in run.stderr, run.stderr
    assert "huge.tif': one tile or strip (100000 x 100000 uint8 samples)" in run.stdout
    assert "save it tiled" in run.stdout

    short = zlib.compress(b"\x07" * 100)  # each strip declares 1000 x 20000 bytes
    lying = _tiff_of_one_page(tmp_path / "lying.tif", 20_000, 20_000, 1000, [short] * 20)
    plane = open_plane(str(lying), SelectionConfig())
    with pytest.raises(ImageReadError, match=r"'.*lying.tif': a tile or strip of this TIFF cannot be read"):
        plane.read_region(slice(0, 512), slice(0, 512))


def test_float16_and_64_bit_integer_tiffs_segment_as_their_wider_or_narrower_twins(tmp_path, synthetic_dataset,
                                                                                   predictor, tiny_checkpoint):
    """A float16 TIFF failed with 'NotImplementedError: float16' (OpenCV's normalisation), an int64
    one with zarr's 'No Zarr data type found' (the image copy), neither naming a problem of the file."""
    nuclei = read_image(str(synthetic_dataset / "images" / "synth_0000.png"))
    source = tmp_path / "source"
    source.mkdir()
    twins = {"half": (np.float16, np.float32), "long": (np.int64, np.int32), "huge": (np.uint64, np.float64)}
    for name, (stored, read) in twins.items():
        values = nuclei.astype(stored) * (2**40 if name == "huge" else 1)
        tifffile.imwrite(source / f"{name}.tif", values)
        tifffile.imwrite(source / f"{name}_twin.tif", values.astype(read))
        image, _ = read_source(str(source / f"{name}.tif"), SelectionConfig())
        assert image.dtype == read and np.array_equal(image, values.astype(read))
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    report = segment_images(sorted((path.stem, str(path)) for path in source.iterdir()), store, predictor,
                            model_record(predictor, "tiny"))
    assert not report.failed and len(report.done) == 6
    for name in twins:
        np.testing.assert_array_equal(store.read_mask(name), store.read_mask(f"{name}_twin"))

    # Block by block (read region by region, with no whole image to narrow): float16 as float32, and
    # 64-bit integers as float64, into the image copy too
    from cellseg.config import BlockConfig

    blockwise = predictor.config.model_copy(update={"blocks": BlockConfig(above_pixels=1000, block_size=128)})
    job = SegmentJob(source_url=str(source), store_url=str(tmp_path / "blocks.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=blockwise)
    report = run_segmentation(job)
    assert not report.failed and len(report.done) == 6, report.failed
    blocks = ResultStore.open(job.store_url, mode="r")
    assert blocks.record("half")["blocks"]["count"] >= 1
    for name in twins:
        np.testing.assert_array_equal(blocks.read_mask(name), blocks.read_mask(f"{name}_twin"))
