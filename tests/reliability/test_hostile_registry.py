"""A registry that one bad file must not hide or break (issue 19): a corrupt model.json leaves
the other versions listed and is named; a version name that is a path (`../outside/ver`) is
refused, current.json unchanged; a corrupt current.json is named; a checkpoint with NaN weights
is never registered.
"""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import Checkpoint, CheckpointError, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.model import UNet
from cellseg.registry import Registry
from tests.conftest import cellseg
from tests.reliability.runs import assert_one_line_error

pytestmark = pytest.mark.integration


def _checkpoint(epoch: int) -> Checkpoint:
    torch.manual_seed(epoch)
    config = ModelConfig(depth=2, base_width=4)
    return Checkpoint(config, UNet(config).state_dict(), TrainConfig(device="cpu", max_minutes=None),
                      {"val_dice": 0.5 + epoch / 100}, epoch=epoch)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def registries(tmp_path_factory):
    """Two registries of three versions, the second made current: in `damaged` the third version's
    model.json is cut short; beside `paths` lies `outside/ver`, a well-formed version outside it."""
    root = tmp_path_factory.mktemp("registries")
    clean = Registry(str(root / "paths"))
    versions = []
    for epoch in (1, 2, 3):
        save_checkpoint(_checkpoint(epoch), str(root / f"model-{epoch}.pt"))
        versions.append(clean.register(str(root / f"model-{epoch}.pt")).version)
    clean.promote(versions[1])
    shutil.copytree(root / "paths", root / "damaged")
    shutil.copytree(root / "paths" / versions[0], root / "outside" / "ver")
    meta = root / "damaged" / versions[2] / "model.json"
    meta.write_bytes(meta.read_bytes()[:40])
    shutil.copytree(root / "paths", root / "bad-current")
    (root / "bad-current" / "current.json").write_text('{"version": ')
    return root, versions


@pytest.fixture(scope="module")
def runs(registries):
    """{case: completed `cellseg models ...`} run at once, with each registry's files before and after."""
    root, versions = registries
    cases = {
        "list damaged": ("list", "--registry", str(root / "damaged")),
        "promote damaged": ("promote", versions[2], "--registry", str(root / "damaged")),
        "promote outside": ("promote", "../outside/ver", "--registry", str(root / "paths")),
        "show outside": ("show", "../outside/ver", "--registry", str(root / "paths")),
        "list bad current": ("list", "--registry", str(root / "bad-current")),
        "show bad current": ("show", "--registry", str(root / "bad-current")),
    }
    before = {name: _snapshot(root / name) for name in ("paths", "damaged", "bad-current", "outside")}
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(cases, pool.map(lambda args: cellseg("-q", "models", *args, check=False), cases.values()),
                           strict=True))
    after = {name: _snapshot(root / name) for name in before}
    return results, before, after


def _one_line_error(result, *fragments: str) -> str:
    return assert_one_line_error(result, *fragments, prefix="cellseg models: error: ")


def test_a_corrupt_model_json_hides_no_other_version_and_is_named(registries, runs):
    _, versions = registries
    results, _, _ = runs
    listed = results["list damaged"]
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(line.startswith(f"  {versions[0]}  val_dice 0.51") for line in lines), listed.stdout
    assert any(line.startswith(f"* {versions[1]}  val_dice 0.52") for line in lines), listed.stdout
    assert [line for line in lines if versions[2] in line] == [
        next(line for line in lines if line.startswith(f"! version {versions[2]}: unreadable model.json (")),
    ]


def test_a_version_with_a_corrupt_model_json_cannot_be_promoted(registries, runs):
    _, versions = registries
    results, before, after = runs
    _one_line_error(results["promote damaged"], f"version {versions[2]}: unreadable model.json")
    assert after["damaged"] == before["damaged"]


@pytest.mark.parametrize("case", ["promote outside", "show outside"])
def test_a_version_name_that_is_a_path_is_refused(registries, runs, case):
    root, _ = registries
    results, before, after = runs
    _one_line_error(results[case], "'../outside/ver' is not a version name of registry", str(root / "paths"))
    assert after == before  # current.json still names the version it named


def test_a_corrupt_current_json_is_named_and_the_versions_still_listed(registries, runs):
    root, versions = registries
    results, before, after = runs
    listed = results["list bad current"]
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert all(any(line.startswith(f"  {version}  ") for line in listed.stdout.splitlines()) for version in versions)
    assert "! registry" in listed.stdout and "current.json is unreadable" in listed.stdout
    _one_line_error(results["show bad current"], str(root / "bad-current"), "current.json is unreadable")
    assert after["bad-current"] == before["bad-current"]


def test_a_checkpoint_with_nan_weights_is_never_registered(tmp_path):
    payload = _checkpoint(1).to_dict()  # as a diverged training would have saved it, before save_checkpoint refused to
    payload["state_dict"] = {**payload["state_dict"], "head.bias": torch.tensor([float("nan")])}
    torch.save(payload, tmp_path / "nan.pt")
    registry = Registry(str(tmp_path / "registry"))
    with pytest.raises(CheckpointError, match=r"nan\.pt.*'head\.bias' holds NaN"):
        registry.register(str(tmp_path / "nan.pt"), promote=True)
    assert registry.versions() == [] and not (tmp_path / "registry").exists()
