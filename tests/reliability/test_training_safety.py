"""`cellseg train` never loses a run or saves a broken model (issue 19): a learning rate that
makes the loss NaN stops training at once with one line naming the epoch and the cause, and
nothing of that epoch is written; a folder that already holds a run is refused unless --resume
continues it or --overwrite replaces it; --out naming a file, or a folder of images, is refused. The train-unet flow
trains each run in a folder of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.loaded_pairs import load_pairs
from cellseg.pairs import pair_images_and_masks, split_train_val
from cellseg.synth import write_dataset
from cellseg.train import train
from tests.conftest import cellseg
from tests.reliability.runs import assert_one_line_error

pytestmark = pytest.mark.integration

RUN_FILES = ("best.pt", "last.pt", "history.json")
MODEL = ModelConfig(depth=2, base_width=4)
TRAINING = TrainConfig(epochs=1, patch_size=64, patches_per_image=1, device="cpu", init_from=None, max_minutes=None)
FLAGS = ("--epochs", "1", "--patch-size", "64", "--patches-per-image", "1", "--device", "cpu", "--from-scratch",
         "--depth", "2", "--base-width", "4")


def _digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in RUN_FILES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished one-epoch run copied into one folder per case, each case run once through the CLI
    (all at once): {case: (completed `cellseg -q train`, its --out, the run's digests before)}."""
    root = tmp_path_factory.mktemp("training")
    dataset = root / "data"
    write_dataset(str(dataset), count=6, size=64, seed=5)
    pairs = pair_images_and_masks(str(dataset / "images"), str(dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, TRAINING.val_fraction, TRAINING.seed)
    train(load_pairs(train_pairs, MODEL.normalization), load_pairs(val_pairs, MODEL.normalization),
          root / "original", MODEL, TRAINING)
    (root / "a-file").write_text("my notes, not a training folder\n")
    cases = {  # case -> (--out, extra flags)
        "diverging": (root / "fresh", ("--lr", "1e30")),
        "existing": (root / "existing", ()),
        "overwrite-diverging": (root / "overwrite-diverging", ("--overwrite", "--lr", "1e30")),
        "overwrite": (root / "overwrite", ("--overwrite",)),
        "resume": (root / "resume", ("--resume", "--epochs", "2")),
        "file": (root / "a-file", ()),
        "images": (dataset / "images", ("--overwrite",)),
    }
    for case, (out, _) in cases.items():
        if case not in ("diverging", "file", "images"):
            shutil.copytree(root / "original", out)
    before = {case: _digests(out) for case, (out, _) in cases.items() if case not in ("diverging", "file", "images")}

    def run(case: str):
        out, extra = cases[case]
        return cellseg("-q", "train", "--images", str(dataset / "images"), "--masks", str(dataset / "masks"),
                       "--out", str(out), *FLAGS, *extra, check=False)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(run, cases), strict=True))
    return {case: (results[case], cases[case][0], before.get(case)) for case in cases}, root


def _one_line_error(result, *fragments: str) -> str:
    return assert_one_line_error(result, *fragments, prefix="cellseg train: error: ")


def test_a_loss_gone_nan_stops_training_naming_the_epoch_and_the_learning_rate(runs):
    cases, _ = runs
    result, out, _ = cases["diverging"]
    _one_line_error(result, "training diverged in epoch 1", "the training loss is nan", "learning rate (1e+30)",
                    "no checkpoint was written")
    assert not any((out / name).exists() for name in RUN_FILES)  # no NaN checkpoint, no history


def test_a_diverging_run_keeps_the_last_good_checkpoint(runs):
    cases, _ = runs
    result, out, before = cases["overwrite-diverging"]
    _one_line_error(result, "training diverged in epoch 1", f"the 'best.pt' in '{out}' is kept")
    assert _digests(out) == before
    assert load_checkpoint(str(out / "best.pt")).epoch == 1  # loads: finite weights, digest intact


def test_a_folder_holding_a_run_is_refused_naming_what_would_be_lost(runs):
    cases, _ = runs
    result, out, before = cases["existing"]
    _one_line_error(result, f"'{out}' already holds a training run (best.pt, last.pt, history.json, 1 epoch of "
                            "history)", "--resume", "--overwrite")
    assert _digests(out) == before
    assert not (out / "manifest.json").exists()  # refused before anything was written


def test_overwrite_replaces_the_run(runs):
    cases, _ = runs
    result, out, before = cases["overwrite"]
    assert result.returncode == 0, result.stderr
    assert all(_digests(out)[name] != before[name] for name in RUN_FILES)
    assert load_checkpoint(str(out / "best.pt")).dataset_manifest_hash is not None  # written by this run
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_resume_continues_the_run(runs):
    cases, root = runs
    result, out, _ = cases["resume"]
    assert result.returncode == 0, result.stderr
    history = json.loads((out / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert history[0] == json.loads((root / "original" / "history.json").read_text())[0]
    assert load_checkpoint(str(out / "last.pt")).epoch == 2


def test_out_naming_a_file_is_refused(runs):
    cases, _ = runs
    result, out, _ = cases["file"]
    _one_line_error(result, f"training folder '{out}' is an existing file, not a folder")
    assert out.read_text() == "my notes, not a training folder\n"


def test_out_holding_images_is_refused_even_with_overwrite(runs):
    """--out given the images folder put the run's pictures among the images, where the next predict
    on that folder segmented training_curves.png as a microscopy image."""
    cases, _ = runs
    result, out, _ = cases["images"]
    _one_line_error(result, f"training folder '{out}' holds images (synth_0000.png, synth_0001.png, synth_0002.png, …)",
                    "choose another folder")
    assert sorted(path.name for path in out.iterdir()) == [f"synth_{index:04d}.png" for index in range(6)]


def test_masks_without_a_cell_are_refused_before_training(tmp_path):
    """All-background masks trained to a validation Dice of 0 and exit status 0, without a word."""
    write_dataset(str(tmp_path / "data"), count=4, size=64, seed=5)
    for mask in (tmp_path / "data" / "masks").iterdir():
        Image.new("L", (64, 64)).save(mask)
    result = cellseg("-q", "train", "--images", str(tmp_path / "data/images"), "--masks", str(tmp_path / "data/masks"),
                     "--out", str(tmp_path / "run"), *FLAGS, check=False)
    _one_line_error(result, f"none of the 3 training masks (under '{tmp_path / 'data/masks'}') has a cell pixel: there "
                            "is nothing to learn")
    assert not (tmp_path / "run").exists()


def test_the_train_unet_flow_never_trains_into_another_runs_folder(tmp_path):
    from cellseg.flows.train import new_run_dir

    first = Path(new_run_dir(str(tmp_path), "brave-otter"))
    assert first == tmp_path / "brave-otter"
    first.mkdir()
    second = Path(new_run_dir(str(tmp_path), "brave-otter"))  # flow run names repeat
    assert second.parent == tmp_path and second.name.startswith("brave-otter-") and not second.exists()
