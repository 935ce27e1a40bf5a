"""Hostile image files given to `cellseg predict` (issue 19: a bypassable pixel limit, decoders
outside the product's formats, silent wrong answers from pixel values, and the warnings a done
image carries).

One folder holds a planar TIFF whose samples multiply its size, a TIFF of many samples on a
small plane, an EPS file named `.png`, black and white images, a float TIFF with a NaN, a
three-page TIFF and one good image. One run of the real CLI segments it; each refused file is
recorded as failed and printed with its name and problem, each oddity of a done image is a
warning in the store, in the summary and on the terminal, and a rerun changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from cellseg.store import ResultStore
from cellseg.synth import encode_png, generate_sample
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

MAX_PIXELS = 1000
MODEL = "general"  # a shipped model: nothing to train, and every image here is tiny

FAILED = {  # file -> what the recorded and printed failure must say
    "bomb.tif": f"320000 pixels exceeds the limit of {MAX_PIXELS}",  # (3, 16, 20000) planar, 1 KB of zlib
    "samples.tif": "the image (64 x 20 x 20 uint8 samples) would take 25600 bytes, over the limit of 8000",
    "figure.png": "not a readable image: its content is EPS, not PNG, TIFF or JPEG",
    "nan.tif": "1 of 900 pixels are NaN or infinite",
}
WARNED = {  # file -> the warning its done result carries
    "black.png": "image is constant (value 0): no cells",
    "white.png": "image is constant (value 255): no cells",
    "pages.tif": "uses page 0 of 3: the other pages are not segmented; --z N segments page N, --z max their projection",
}
DONE = {"good", "black", "white", "pages"}

FAKE_GHOSTSCRIPT = """#!/bin/sh
touch "{marker}"
"""


def _write_inputs(folder: Path) -> None:
    good = generate_sample(np.random.default_rng(3), (96, 96)).image[:30, :30]  # 900 pixels: within the limit
    (folder / "good.png").write_bytes(encode_png(good))
    tifffile.imwrite(folder / "bomb.tif", np.zeros((3, 16, 20000), np.uint8), photometric="rgb",
                     planarconfig="separate", compression="zlib")
    tifffile.imwrite(folder / "samples.tif", np.zeros((64, 20, 20), np.uint8), photometric="minisblack",
                     planarconfig="separate", compression="zlib")
    (folder / "figure.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 30 30\nshowpage\n")
    (folder / "black.png").write_bytes(encode_png(np.zeros((30, 30), np.uint8)))
    (folder / "white.png").write_bytes(encode_png(np.full((30, 30), 255, np.uint8)))
    with_nan = good.astype(np.float32)
    with_nan[3, 4] = np.nan
    tifffile.imwrite(folder / "nan.tif", with_nan)
    with tifffile.TiffWriter(folder / "pages.tif") as pages:
        for page in (good, good[::-1], good[:, ::-1]):
            pages.write(page, photometric="minisblack", metadata=None)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """The folder, the store, and two `cellseg predict` runs over it (the second a rerun), with a
    fake Ghostscript first on the PATH that leaves a marker if any decoder ever calls it."""
    root = tmp_path_factory.mktemp("hostile")
    images, tools = root / "incoming", root / "bin"
    images.mkdir()
    tools.mkdir()
    _write_inputs(images)
    marker = root / "ghostscript-ran"
    fake = tools / "gs"
    fake.write_text(FAKE_GHOSTSCRIPT.format(marker=marker))
    fake.chmod(0o755)
    inputs_before = {path.name: path.read_bytes() for path in images.iterdir()}
    store = root / "out.zarr"
    arguments = ("predict", "--model", MODEL, "--images", str(images), "--out", str(store),
                 "--max-pixels", str(MAX_PIXELS), "--device", "cpu")
    env = {"PATH": f"{tools}{os.pathsep}{os.environ.get('PATH', '')}"}
    first = cellseg(*arguments, env=env, check=False)
    done = ResultStore.open(str(store), mode="r") if store.exists() else None
    masks = {image_id: done.read_mask(image_id) for image_id in done.done_ids()} if done else {}
    rerun = cellseg(*arguments, env=env, check=False)
    return SimpleNamespace(images=images, store=store, first=first, rerun=rerun, masks=masks, marker=marker,
                           inputs_before=inputs_before)


def test_each_hostile_file_is_refused_or_warned_about_by_name_in_one_line(run):
    first = run.first
    assert first.returncode != 0, (first.stdout, first.stderr)  # some images failed (the rest are done, below)
    assert "Traceback" not in first.stderr
    assert f"segmented {len(DONE)}, skipped 0 already done, failed {len(FAILED)}, {len(WARNED)} warnings" in first.stdout
    lines = first.stdout.splitlines()
    for name, fragment in FAILED.items():
        assert any(line.startswith(f"  failed: {run.images / name}: ") and fragment in line for line in lines), name
    for name, warning in WARNED.items():
        assert f"  warning: {run.images / name}: {warning}" in lines, name


def test_the_store_records_each_failure_and_each_warning_and_the_good_image_is_done(run):
    store = ResultStore.open(str(run.store), mode="r")
    assert store.done_ids() == DONE
    failures = {Path(failure["source_url"]).name: failure["error"] for failure in store.failures()}
    assert failures.keys() == FAILED.keys()
    for name, fragment in FAILED.items():
        assert fragment in failures[name] and name in failures[name], failures[name]
    for name, warning in WARNED.items():
        assert store.record(Path(name).stem)["warnings"] == [warning]
    assert "warnings" not in store.record("good")
    for constant in ("black", "white"):  # no invented cells: an empty mask, said so
        assert store.record(constant)["statistics"]["cell_count"] == 0 and not store.read_mask(constant).any()
    np.testing.assert_array_equal(store.read_mask("pages"), store.read_mask("good"))  # page 0 is the good image


def test_no_decoder_outside_png_tiff_and_jpeg_ever_runs(run):
    assert not run.marker.exists(), "an EPS file named .png was handed to Ghostscript"


def test_a_rerun_keeps_every_result_and_tries_the_failed_files_again(run):
    rerun = run.rerun
    assert rerun.returncode == run.first.returncode and "Traceback" not in rerun.stderr
    assert f"segmented 0, skipped {len(DONE)} already done, failed {len(FAILED)}" in rerun.stdout
    store = ResultStore.open(str(run.store), mode="r")
    assert store.done_ids() == DONE
    for image_id, mask in run.masks.items():
        np.testing.assert_array_equal(store.read_mask(image_id), mask)
    assert {path.name: path.read_bytes() for path in run.images.iterdir()} == run.inputs_before
