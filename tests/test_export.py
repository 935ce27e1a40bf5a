"""Exported models (TorchScript, ONNX) give the mask `cellseg predict` gives."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.export import export_model
from cellseg.infer import Predictor
from cellseg.io import read_image
from cellseg.normalize import normalize_image
from cellseg.registry import Registry
from cellseg.synth import write_dataset


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Synthetic images of awkward sizes: odd, tiny and not multiples of 2**depth."""
    root = tmp_path_factory.mktemp("export-images")
    write_dataset(str(root), count=3, size=90, seed=4, vary_size=True)
    return [read_image(str(path)) for path in sorted((root / "images").iterdir())]


def _reference(checkpoint_path: Path, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictor = Predictor.from_checkpoint(str(checkpoint_path), PredictConfig(amp=False, device="cpu"))
    probability = predictor.probabilities([image])[0]
    return probability, probability > 0.5


def _input(checkpoint_path: Path, image: np.ndarray) -> np.ndarray:
    normalization = load_checkpoint(str(checkpoint_path)).model_config.normalization
    return normalize_image(image, normalization)[None, None].astype(np.float32)


def test_torchscript_export_gives_the_same_masks_for_any_size(tiny_checkpoint, images, tmp_path):
    out = tmp_path / "model.pt"
    description = export_model(load_checkpoint(str(tiny_checkpoint)), out, "torchscript", model_version="v1")
    scripted = torch.jit.load(str(out))
    for image in [*images, images[0][:9, :13]]:
        probability, mask = _reference(tiny_checkpoint, image)
        with torch.no_grad():
            exported = scripted(torch.from_numpy(_input(tiny_checkpoint, image)))[0, 0].numpy()
        assert exported.shape == image.shape
        np.testing.assert_allclose(exported, probability, atol=1e-5)
        np.testing.assert_array_equal(exported > description["threshold"], mask)
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["model_version"] == "v1" and sidecar["input"]["normalization"]["polarity"] == "auto"
    assert sidecar["cell_diameter"] is None and "cell_diameter_how" not in sidecar


def test_export_says_at_which_cell_size_the_model_works(tiny_checkpoint, tmp_path):
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    at_size = dataclasses.replace(checkpoint, model_config=checkpoint.model_config.model_copy(update={"cell_diameter": 18.0}))
    description = export_model(at_size, tmp_path / "model.pt", "torchscript")
    assert description["cell_diameter"] == 18.0 and "resample" in description["cell_diameter_how"]
    assert json.loads((tmp_path / "model.pt.json").read_text())["cell_diameter"] == 18.0


def test_export_records_the_threshold_predict_uses_with_the_model(tiny_checkpoint, images, tmp_path):
    """Training decides a model's threshold (here 0.7); the description gives that one, so that the
    exported model's mask is `predict`'s, not one at 0.5."""
    decided = dataclasses.replace(load_checkpoint(str(tiny_checkpoint)), threshold=0.7)
    description = export_model(decided, tmp_path / "model.pt", "torchscript")
    assert description["threshold"] == 0.7
    assert json.loads((tmp_path / "model.pt.json").read_text())["threshold"] == 0.7
    predictor = Predictor(decided, PredictConfig(amp=False, device="cpu"))
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        exported = scripted(torch.from_numpy(_input(tiny_checkpoint, images[0])))[0, 0].numpy()
    np.testing.assert_array_equal(exported > description["threshold"], predictor.masks([images[0]])[0])


def test_export_describes_a_distance_map_models_second_channel(tmp_path):
    """The shipped nuclei model (and every model fine-tuned from it) has a distance map: the exported
    network returns it as a second channel, and the description says so instead of (N, 1, H, W)."""
    from cellseg.bundled import shipped_checkpoint

    checkpoint = load_checkpoint(shipped_checkpoint("nuclei"))
    description = export_model(checkpoint, tmp_path / "model.pt", "torchscript")
    with torch.no_grad():
        output = torch.jit.load(str(tmp_path / "model.pt"))(torch.rand(1, 1, 40, 56))
    assert description["output"]["shape"] == ["N", 2, "H", "W"] and tuple(output.shape) == (1, 2, 40, 56)
    assert "channel 1: each cell's distance to its outline" in description["output"]["meaning"]


def test_onnx_export_gives_the_same_masks(tiny_checkpoint, images, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    description = export_model(load_checkpoint(str(tiny_checkpoint)), out, "onnx")
    session = onnxruntime.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["image"]
    for image in images:
        assert min(image.shape) >= description["input"]["min_side"]
        probability, mask = _reference(tiny_checkpoint, image)
        exported = session.run(None, {"image": _input(tiny_checkpoint, image)})[0][0, 0]
        assert exported.shape == image.shape
        np.testing.assert_allclose(exported, probability, atol=1e-4)
        assert np.mean((exported > 0.5) == mask) > 0.9999


@pytest.mark.integration
def test_cellseg_models_export_a_registered_version(tiny_checkpoint, images, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    version = registry.register(str(tiny_checkpoint), promote=True).version
    out = tmp_path / "exported" / "model.pt"
    command = [str(Path(sys.executable).parent / "cellseg"), "models", "export", "--registry", str(tmp_path / "registry"),
               "--format", "torchscript", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert version in result.stdout
    assert json.loads(Path(f"{out}.json").read_text())["model_version"] == version
    _, mask = _reference(tiny_checkpoint, images[0])
    with torch.no_grad():
        exported = torch.jit.load(str(out))(torch.from_numpy(_input(tiny_checkpoint, images[0])))[0, 0].numpy()
    np.testing.assert_array_equal(exported > 0.5, mask)

    out.write_bytes(b"a model of mine")  # an export never replaces a file unless told to
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 2
    assert f"{out} and {out}.json already exist; replace them (--overwrite) or choose another file" in refused.stderr
    assert out.read_bytes() == b"a model of mine"
    replaced = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=300, check=False)
    assert replaced.returncode == 0, replaced.stderr
    assert torch.jit.load(str(out)) is not None

    both = subprocess.run([*command, version, "--checkpoint", str(tiny_checkpoint), "--overwrite"], capture_output=True,
                          text=True, timeout=300, check=False)  # one of them would be left out without a word
    assert both.returncode == 2
    assert both.stderr == f"cellseg models: error: give a registered version ({version}) or --checkpoint, not both\n"


def test_export_to_a_url_is_refused_and_a_file_url_is_a_local_file(tiny_checkpoint, tmp_path, monkeypatch):
    """`--out s3://bucket/m.pt` wrote ./s3:/bucket/m.pt and said it had exported to the bucket."""
    monkeypatch.chdir(tmp_path)
    command = [str(Path(sys.executable).parent / "cellseg"), "models", "export", "--checkpoint", str(tiny_checkpoint)]
    url = "s3://KEY:SECRET@lab-models/m.pt"
    result = subprocess.run([*command, "--out", url], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "SECRET" not in result.stderr
    assert result.stderr == ("cellseg models: error: cannot export to 's3://KEY:********@lab-models/m.pt': models export writes a "
                             "local file; export to a local path, then copy it and its .json to the storage\n")
    assert list(tmp_path.iterdir()) == []
    result = subprocess.run([*command, "--out", f"file://{tmp_path}/m.pt"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]


@pytest.mark.parametrize("under", ["", "sub"], ids=["in-a-file", "below-a-file"])
def test_export_under_a_file_is_one_line_naming_the_file(tiny_checkpoint, tmp_path, under):
    """It was a FileExistsError or NotADirectoryError traceback, exit status 1."""
    blocking = tmp_path / "notes"
    blocking.write_text("")
    out = blocking / under / "model.pt" if under else blocking / "model.pt"

    result = subprocess.run([str(Path(sys.executable).parent / "cellseg"), "models", "export", "--checkpoint",
                             str(tiny_checkpoint), "--out", str(out)], capture_output=True, text=True, check=False)

    assert result.returncode == 2
    assert result.stderr == f"cellseg models: error: cannot write '{out}': '{blocking}' is a file, not a folder\n"
    assert blocking.read_text() == ""


def test_export_into_a_folder_it_cannot_write_is_one_line_naming_the_file(tiny_checkpoint, tmp_path):
    """torch's writer raised a RuntimeError: a traceback, exit status 1."""
    import os
    import shutil

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    command = [str(Path(sys.executable).parent / "cellseg"), "models", "export", "--checkpoint", str(tiny_checkpoint),
               "--out", str(locked / "model.pt")]
    if os.geteuid() == 0:  # root writes anywhere: run it without the capabilities that allow it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop the permission override")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and str(locked / "model.pt") in result.stderr, result.stderr
    assert list(locked.iterdir()) == []
