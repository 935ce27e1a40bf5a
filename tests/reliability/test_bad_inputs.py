"""One nightly directory holding every kind of bad or odd input, segmented by the real flow:
odd-but-valid images are segmented, bad ones are recorded with the file and the problem, and
the rest of the run completes with nothing lost."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.config import PredictConfig
from cellseg.io import read_image
from cellseg.jobs import SegmentJob
from cellseg.model_source import ModelSource, load_predictor
from cellseg.store import ResultStore
from cellseg.synth import encode_png, generate_sample

pytestmark = pytest.mark.integration

MAX_PIXELS = 300 * 300


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{file name: expected error fragment, or None when it must be segmented}, written to a directory."""
    rng = np.random.default_rng(7)
    cells = generate_sample(rng, (96, 96)).image
    good = encode_png(cells)
    sixteen = (cells.astype(np.uint16) * 257)
    files: dict[str, tuple[bytes, str | None]] = {
        "good.png": (good, None),
        "truncated.png": (good[: len(good) // 2], "not a readable image"),
        "empty.png": (b"", "file is empty (0 bytes)"),
        "notes.png": (b"these are my notes, not an image\n", "not a readable image"),
        "archive.tif": (b"PK\x03\x04" + bytes(200), "not a readable image"),
        "sixteen bit.tif": (_tiff(sixteen), None),
        "rgb.png": (_png(np.stack([cells] * 3, axis=-1)), None),
        "rgba.png": (_png(np.dstack([cells] * 3 + [np.full_like(cells, 255)])), None),
        "palette.png": (_png(np.stack([cells] * 3, axis=-1), mode="P"), None),
        "one pixel.png": (encode_png(np.full((1, 1), 200, np.uint8)), None),
        "thin.png": (encode_png(cells[:2, :]), None),
        "zellkern_ü_细胞.png": (good, None),
        "too large.png": (encode_png(np.zeros((400, 400), np.uint8)), f"exceeds the limit of {MAX_PIXELS}"),
        "twin.png": (good, "share the image id 'twin'"),
        "twin.tif": (_tiff(cells), "share the image id 'twin'"),
        "__reserved.png": (good, "cannot name a store entry"),
        "zarr.json.png": (good, "cannot name a store entry"),  # would name the store's own metadata file
    }
    root = tmp_path_factory.mktemp("zoo") / "incoming"
    root.mkdir()
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    (root / "README.txt").write_text("not an image, ignored with a warning")
    return root, {name: expected for name, (_, expected) in files.items()}


@pytest.fixture(scope="module")
def zoo_run(prefect_harness, zoo, registry, tmp_path_factory):
    from cellseg.flows.segment import segment_images_flow

    root, _ = zoo
    store_url = str(tmp_path_factory.mktemp("out") / "nightly.zarr")
    summary = segment_images_flow(SegmentJob(source_url=str(root), store_url=store_url, registry_url=registry,
                                  shard_size=3, predict=PredictConfig(max_pixels=MAX_PIXELS)))
    return summary, store_url


def test_every_bad_file_is_reported_with_its_name_and_problem(zoo, zoo_run):
    _root, expected = zoo
    summary, _ = zoo_run
    failures = {failure["source_url"].rsplit("/", 1)[-1]: failure["error"] for failure in summary["failed"]}
    bad = {name: fragment for name, fragment in expected.items() if fragment is not None}
    assert failures.keys() == bad.keys()
    for name, fragment in bad.items():
        assert fragment in failures[name], (name, failures[name])


def test_odd_but_valid_images_are_segmented_like_their_plain_equivalents(zoo, zoo_run, registry):
    root, expected = zoo
    summary, store_url = zoo_run
    store = ResultStore.open(store_url, mode="r")
    good = sorted(name.rsplit(".", 1)[0] for name, fragment in expected.items() if fragment is None)
    assert sorted(store.done_ids()) == good and summary["done"] == len(good)
    predictor = load_predictor(ModelSource(registry, "current"), PredictConfig())
    for name, fragment in expected.items():
        if fragment is None:
            image_id = name.rsplit(".", 1)[0]
            (expected_mask,) = predictor.masks([read_image(str(root / name))])
            mask = store.read_mask(image_id)
            assert mask.shape == expected_mask.shape and store.record(image_id)["shape"] == list(mask.shape)
    # Converted colour images are segmented as their luma: the same cells as the grayscale original.
    np.testing.assert_array_equal(store.read_mask("rgb"), store.read_mask("good"))


def test_failures_are_recorded_in_the_store_and_retried_by_the_next_run(zoo, zoo_run, registry):
    from cellseg.flows.segment import segment_images_flow

    root, _expected = zoo
    summary, store_url = zoo_run
    store = ResultStore.open(store_url, mode="r")
    recorded = {image_id for image_id, record in store.records() if record.get("status") == "failed"}
    # Decoding failures are stored per image, and files sharing an id under that id; names that
    # cannot be store entries are only reported.
    assert recorded == {"truncated", "empty", "notes", "archive", "too large", "twin"}
    assert "share the image id 'twin'" in store.record("twin")["error"]
    done_before = {image_id: store.read_mask(image_id) for image_id in store.done_ids()}
    again = segment_images_flow(SegmentJob(source_url=str(root), store_url=store_url, registry_url=registry,
                                shard_size=3, predict=PredictConfig(max_pixels=MAX_PIXELS)))
    assert again["done"] == 0 and again["skipped"] == len(done_before)
    assert len(again["failed"]) == len(summary["failed"])
    for image_id, mask in done_before.items():
        np.testing.assert_array_equal(ResultStore.open(store_url, mode="r").read_mask(image_id), mask)


def test_summary_artifact_lists_the_failures(zoo_run):
    from prefect.artifacts import Artifact

    summary, _ = zoo_run
    artifact = Artifact.get("segment-images-summary").data
    assert "truncated.png" in artifact and "empty.png" in artifact
    json.dumps(summary)  # the summary is plain data
