"""Tests for cellseg/registry.py: register, list, promote, resolve and checksum-verified loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.cli import main
from cellseg.config import PredictConfig
from cellseg.model_source import ModelSource, load_predictor, shared_predictor
from cellseg.pictures import overlay_gallery, training_curves
from cellseg.registry import RUN_FILES, Registry, RegistryError, RegistryMissing
from cellseg.report import CURVES_FILE, GALLERY_FILE
from cellseg.storage_errors import StorageError
from cellseg.train import HISTORY_FILE

VERSION_NAME = re.compile(r"(\d{8}-\d{6})-([0-9a-f]{8})")
MANIFEST_HASH = "ab" * 32
CPU = PredictConfig(device="cpu")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def checkpoint_file(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint (the session one is shared by other tests)."""
    return Path(shutil.copy(tiny_checkpoint, tmp_path / "best.pt"))


def variant(source: Path, out: Path, epoch: int) -> Path:
    """The same weights saved with another epoch and a dataset hash: a file with different bytes."""
    checkpoint = dataclasses.replace(load_checkpoint(str(source)), epoch=epoch, dataset_manifest_hash=MANIFEST_HASH)
    save_checkpoint(checkpoint, str(out))
    return out


def write_run_files(folder: Path) -> dict[str, bytes]:
    """What a training run leaves beside its checkpoint in `folder`: history.json and the two
    pictures, drawn as `cellseg train` draws them; {name: contents}."""
    history = [{"epoch": 1, "train_loss": 0.9, "val_loss": 1.0, "val_dice": 0.4},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_dice": 0.7}]
    (folder / HISTORY_FILE).write_text(json.dumps(history))
    training_curves(history, str(folder / CURVES_FILE))
    cells = np.zeros((32, 32), dtype=np.int32)
    cells[8:20, 8:20] = 1
    overlay_gallery([cells.astype(np.uint8) * 200], [cells], [cells], ["a"], str(folder / GALLERY_FILE))
    return {name: (folder / name).read_bytes() for name in RUN_FILES}


def model_output(checkpoint) -> torch.Tensor:
    torch.manual_seed(0)
    batch = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        return checkpoint.build_model()(batch)


# --- register and list --------------------------------------------------------------------


def test_register_records_checksum_metrics_and_provenance(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    original = load_checkpoint(str(checkpoint_file))
    before = datetime.now(timezone.utc).replace(microsecond=0)

    meta = registry.register(str(checkpoint_file))

    after = datetime.now(timezone.utc)
    assert registry.versions() == [meta]
    assert meta.checkpoint_sha256 == sha256_of(checkpoint_file)
    assert meta.checkpoint_bytes == checkpoint_file.stat().st_size
    assert meta.epoch == original.epoch
    assert meta.metrics == original.metrics and "val_dice" in meta.metrics
    assert meta.dataset_manifest_hash is None  # the tiny checkpoint was trained without a manifest
    assert meta.architecture == original.model_config.model_dump(mode="json")
    assert meta.architecture["depth"] == 3 and meta.architecture["base_width"] == 8
    assert meta.train_config["epochs"] == 6

    stamp, short_sha = VERSION_NAME.fullmatch(meta.version).groups()
    assert short_sha == meta.checkpoint_sha256[:8]
    registered_at = datetime.strptime(stamp, "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    assert before <= registered_at <= after
    assert registered_at == datetime.fromisoformat(meta.registered).replace(microsecond=0)
    stored = tmp_path / "registry" / meta.version / "checkpoint.pt"
    assert stored.read_bytes() == checkpoint_file.read_bytes()


def test_metrics_that_are_not_numbers_are_left_out_of_a_readable_version(checkpoint_file, tmp_path, caplog):
    """Written as JSON's null, a NaN metric used to leave the version's model.json unreadable and
    its promotion failing."""
    checkpoint = load_checkpoint(str(checkpoint_file))
    checkpoint.metrics = {**checkpoint.metrics, "val_dice": float("nan"), "val_loss": float("inf")}
    save_checkpoint(checkpoint, str(tmp_path / "odd.pt"))
    registry = Registry(str(tmp_path / "registry"))
    version = registry.register(str(tmp_path / "odd.pt"), promote=True)
    assert registry.current() == version.version and registry.versions() == [version]
    assert "val_dice" not in version.metrics and "val_loss" not in version.metrics
    assert version.metrics == {key: value for key, value in checkpoint.metrics.items() if key not in ("val_dice", "val_loss")}
    assert "metrics val_dice, val_loss are not finite numbers; registered without them" in caplog.text


def test_registering_the_same_weights_twice_in_a_second_keeps_both_versions(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    versions = [registry.register(str(checkpoint_file)).version for _ in range(3)]
    assert len(set(versions)) == 3 and [v.version for v in registry.versions()] == sorted(versions)


def test_register_records_the_dataset_hash(checkpoint_file, tmp_path):
    source = variant(checkpoint_file, tmp_path / "with-manifest.pt", epoch=7)

    meta = Registry(str(tmp_path / "registry")).register(str(source))

    assert meta.dataset_manifest_hash == MANIFEST_HASH
    assert meta.epoch == 7
    assert meta.checkpoint_sha256 == sha256_of(source)


def test_versions_are_listed_oldest_first(checkpoint_file, tmp_path):
    # Register the checkpoint whose checksum sorts last first: within one second the version
    # names alone would put it second.
    one, two = checkpoint_file, variant(checkpoint_file, tmp_path / "variant.pt", epoch=99)
    first, second = sorted((one, two), key=sha256_of, reverse=True)
    registry = Registry(str(tmp_path / "registry"))

    older = registry.register(str(first))
    newer = registry.register(str(second))

    assert [meta.version for meta in registry.versions()] == [older.version, newer.version]
    assert [meta.checkpoint_sha256 for meta in registry.versions()] == [sha256_of(first), sha256_of(second)]


def test_empty_registry_lists_nothing(tmp_path):
    assert Registry(str(tmp_path / "nowhere")).versions() == []


# --- the training run's history and pictures, kept with the version -----------------------


def test_the_registry_keeps_the_files_cellseg_writes_beside_a_checkpoint():
    assert RUN_FILES == (HISTORY_FILE, CURVES_FILE, GALLERY_FILE)


def test_register_keeps_the_runs_history_and_pictures_beside_the_checkpoint(checkpoint_file, tmp_path):
    written = write_run_files(checkpoint_file.parent)
    registry = Registry(str(tmp_path / "registry"))

    meta = registry.register(str(checkpoint_file))

    folder = tmp_path / "registry" / meta.version
    assert meta.files == list(RUN_FILES)
    assert json.loads((folder / "model.json").read_text())["files"] == list(RUN_FILES)
    assert {name: (folder / name).read_bytes() for name in RUN_FILES} == written
    assert registry.file_url(meta.version, CURVES_FILE) == f"{tmp_path / 'registry'}/{meta.version}/{CURVES_FILE}"
    with pytest.raises(RegistryError, match=f"version {meta.version} keeps no 'best.pt' \\(it keeps checkpoint.pt, model.json, history.json"):
        registry.file_url(meta.version, "best.pt")


def test_register_keeps_what_the_run_left_and_nothing_else(checkpoint_file, tmp_path):
    (checkpoint_file.parent / HISTORY_FILE).write_text("[]")
    (checkpoint_file.parent / "last.pt").write_bytes(checkpoint_file.read_bytes())
    registry = Registry(str(tmp_path / "registry"))

    meta = registry.register(str(checkpoint_file))

    assert meta.files == [HISTORY_FILE]
    assert sorted(path.name for path in (tmp_path / "registry" / meta.version).iterdir()) == [
        "checkpoint.pt", HISTORY_FILE, "model.json"]


def test_models_show_points_at_the_checkpoint_history_and_pictures(checkpoint_file, tmp_path, capsys):
    write_run_files(checkpoint_file.parent)
    url = str(tmp_path / "registry")
    meta = Registry(url).register(str(checkpoint_file))

    assert main(["models", "show", meta.version, "--registry", url]) == 0

    shown = json.loads(capsys.readouterr().out)
    assert shown["files"] == list(RUN_FILES)
    assert shown["urls"] == {name: f"{url}/{meta.version}/{name}" for name in ("checkpoint.pt", *RUN_FILES)}
    assert all(Path(location).is_file() for location in shown["urls"].values())


def test_versions_registered_before_the_run_files_were_kept_still_work(checkpoint_file, tmp_path, capsys):
    # A model.json as cellseg wrote it before it kept a run's files: no "files" field.
    url = str(tmp_path / "registry")
    meta = Registry(url).register(str(checkpoint_file), promote=True)
    model_json = tmp_path / "registry" / meta.version / "model.json"
    older = json.loads(model_json.read_text())
    del older["files"]
    model_json.write_text(json.dumps(older))
    registry = Registry(url)

    assert [found.version for found in registry.versions()] == [meta.version]
    assert registry.get().files == []
    assert registry.load()[1].version == meta.version
    assert main(["models", "show", "--registry", url]) == 0
    assert json.loads(capsys.readouterr().out)["urls"] == {"checkpoint.pt": f"{url}/{meta.version}/checkpoint.pt"}


# --- promote, current, resolve ------------------------------------------------------------


def test_promote_sets_current(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file))
    assert registry.current() is None

    registry.promote(meta.version)

    assert registry.current() == meta.version
    assert registry.resolve("current") == meta.version
    assert registry.get() == meta


def test_a_folder_named_model_json_is_an_unreadable_version_and_a_version_without_its_checkpoint_cannot_be_current(
        checkpoint_file, tmp_path):
    """Junk in a registry folder broke `models list` with a traceback; a version copied in part
    was made current, and the next run failed on it."""
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file))
    (tmp_path / "registry" / "20250101-000000-deadbeef" / "model.json").mkdir(parents=True)
    versions, unreadable = registry.scan()
    assert [found.version for found in versions] == [meta.version]
    assert unreadable == {"20250101-000000-deadbeef": "unreadable model.json (not a file: IsADirectoryError)"}
    with pytest.raises(RegistryError, match=r"unreadable model\.json"):
        registry.promote("20250101-000000-deadbeef")
    (tmp_path / "registry" / meta.version / "checkpoint.pt").unlink()
    with pytest.raises(RegistryError, match=rf"version {meta.version}: checkpoint.pt is missing; it cannot be made current"):
        registry.promote(meta.version)
    assert registry.current() is None


def test_a_current_version_that_was_removed_is_named_so_and_listed_as_a_problem(checkpoint_file, tmp_path, capsys):
    """It was "unreadable model.json (not a file: FileNotFoundError)", and `models list` said nothing."""
    registry = Registry(str(tmp_path / "registry"))
    first = registry.register(str(checkpoint_file))
    second = registry.register(str(checkpoint_file))
    registry.promote(first.version)
    registry.promote(second.version)
    shutil.rmtree(tmp_path / "registry" / second.version)
    gone = (f"registry '{tmp_path / 'registry'}': current.json names version {second.version}, which is not in it "
            "(removed?); mark a registered version current: cellseg models promote VERSION, or cellseg models rollback")
    with pytest.raises(RegistryError) as raised:
        registry.resolve("current")
    assert str(raised.value) == gone
    assert main(["models", "list", "--registry", str(tmp_path / "registry")]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert f"  {first.version}" in listed[0] and f"! {gone}" in listed
    assert main(["models", "show", "--registry", str(tmp_path / "registry")]) == 2
    assert capsys.readouterr().err == f"cellseg models: error: {gone}\n"
    assert registry.rollback() == (second.version, first.version)  # the way back named in the message
    assert registry.resolve("current") == first.version


def test_register_with_promote_makes_the_new_version_current(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    old = registry.register(str(checkpoint_file), promote=True)
    assert registry.current() == old.version

    new = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)), promote=True)

    assert new.version != old.version
    assert registry.current() == new.version
    assert registry.resolve(old.version) == old.version


def test_resolving_an_unknown_version_lists_the_known_ones(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    one = registry.register(str(checkpoint_file))
    two = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)))
    known = [one.version, two.version]  # oldest first

    with pytest.raises(RegistryError, match=r"no version '20000101-000000-deadbeef'") as raised:
        registry.resolve("20000101-000000-deadbeef")

    assert f"(known: {known[0]}, {known[1]})" in str(raised.value)
    with pytest.raises(RegistryError, match="deadbeef"):
        registry.promote("20000101-000000-deadbeef")


def test_unknown_version_in_an_empty_registry_says_none(tmp_path):
    (tmp_path / "registry").mkdir()
    with pytest.raises(RegistryError, match=r"\(known: none\)"):
        Registry(str(tmp_path / "registry")).resolve("v1")


@pytest.mark.parametrize("version", ["20240101-000000-0123abcd", "current"])
def test_a_version_of_a_registry_folder_that_does_not_exist_says_so(tmp_path, version):
    """`predict --model-version V --registry MISSPELT` said "has no version … (known: none)" or "has
    no current model: train one into it", as of an empty registry."""
    missing = tmp_path / "no-such-registry"
    with pytest.raises(RegistryMissing, match=f"^registry '{missing}' does not exist; give the folder a registry was "
                                              r"made in \(--registry, or the settings' registry_url\)$"):
        Registry(str(missing)).resolve(version)
    assert not missing.exists()


def test_current_with_nothing_promoted_is_refused(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.register(str(checkpoint_file))

    assert registry.current() is None
    with pytest.raises(RegistryError, match=r"has no current model: .*--model-version bundled") as raised:
        registry.resolve("current")
    assert ("train one into it (cellseg flow train-unet --registry ..., or with deployments prefect deployment run "
            "'train-unet/train-unet' ...)") in str(raised.value)
    with pytest.raises(RegistryError, match="has no current model"):
        registry.load()


def test_a_version_whose_checkpoint_was_truncated_cannot_be_made_current(checkpoint_file, tmp_path):
    """`models promote` made a version with a half-copied checkpoint current; the nightly run then
    failed on it. Promoting now checks the file against its recorded checksum first."""
    registry = Registry(str(tmp_path / "registry"))
    good = registry.register(str(checkpoint_file), promote=True)
    damaged = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)))
    stored = tmp_path / "registry" / damaged.version / "checkpoint.pt"
    stored.write_bytes(stored.read_bytes()[:5000])

    with pytest.raises(RegistryError, match=rf"'{damaged.version}'.*\(5000 bytes, {damaged.checkpoint_bytes} "
                                            r"registered\): it was modified or corrupted; it cannot be made current"):
        registry.promote(damaged.version)

    assert registry.current() == good.version


def test_rollback_makes_the_versions_current_before_current_again_in_turn(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    one = registry.register(str(checkpoint_file))
    two = registry.register(str(variant(checkpoint_file, tmp_path / "v2.pt", epoch=50)))
    three = registry.register(str(variant(checkpoint_file, tmp_path / "v3.pt", epoch=60)))
    assert registry.promote(one.version) is None
    assert registry.promote(two.version) == one.version
    assert registry.promote(two.version) == two.version  # promoting the current one again changes nothing
    assert registry.promote(three.version) == two.version

    assert registry.rollback() == (three.version, two.version)
    assert registry.current() == two.version
    assert registry.rollback() == (two.version, one.version)
    assert registry.current() == one.version
    with pytest.raises(RegistryError, match=rf"nothing to roll back to: no version was current before {one.version}"):
        registry.rollback()
    assert registry.current() == one.version


def test_rollback_with_nothing_current_or_from_a_current_json_without_history_is_refused(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match="has no current model, so nothing to roll back"):
        registry.rollback()
    old = registry.register(str(checkpoint_file))
    new = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)))
    # current.json as cellseg wrote it before it kept the versions current earlier
    (tmp_path / "registry" / "current.json").write_text(json.dumps({"version": old.version}))
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()

    assert registry.promote(new.version) == old.version
    assert registry.rollback() == (new.version, old.version)


def test_rollback_passes_over_an_earlier_version_that_was_damaged_since(checkpoint_file, tmp_path, caplog):
    registry = Registry(str(tmp_path / "registry"))
    one = registry.register(str(checkpoint_file), promote=True)
    two = registry.register(str(variant(checkpoint_file, tmp_path / "v2.pt", epoch=50)), promote=True)
    three = registry.register(str(variant(checkpoint_file, tmp_path / "v3.pt", epoch=60)), promote=True)
    (tmp_path / "registry" / two.version / "checkpoint.pt").write_bytes(b"junk")

    assert registry.rollback() == (three.version, one.version)
    assert f"passed over on rollback: checkpoint of version '{two.version}'" in caplog.text


def test_a_registry_that_is_a_file_is_named_so_not_empty(tmp_path):
    """`models list --registry FILE` said 'no models registered' and exited 0."""
    path = tmp_path / "registry"
    path.write_text("not a registry")
    registry = Registry(str(path))

    for call in (registry.scan, registry.current, registry.check_writable):
        with pytest.raises(RegistryError, match=rf"registry '{re.escape(str(path))}' is a file, not a registry folder"):
            call()


def test_a_registry_that_cannot_be_written_is_refused_in_one_line_before_and_at_registration(checkpoint_file,
                                                                                              tmp_path):
    """Registering under a path through a file raised NotADirectoryError with a traceback, after
    the whole training; `check_writable` says so before it, and `register` in one line."""
    (tmp_path / "file").write_text("")
    registry = Registry(str(tmp_path / "file" / "registry"))

    with pytest.raises(RegistryError, match=r"registry '.*/file/registry' cannot be written to \(Not a directory\)"):
        registry.check_writable()
    with pytest.raises(RegistryError, match=r"cannot be written to \(Not a directory\)"):
        registry.register(str(checkpoint_file))
    writable = Registry(str(tmp_path / "new" / "registry"))
    writable.check_writable()
    assert list((tmp_path / "new" / "registry").iterdir()) == []  # the probe is gone


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder on a read-only bind mount of tmp_path/source (needs the right to mount: root)."""
    source, mounted = tmp_path / "source", tmp_path / "read-only"
    source.mkdir()
    mounted.mkdir()
    if subprocess.run(["mount", "--bind", str(source), str(mounted)], check=False, capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (not root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(mounted)], check=False,
                          capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield source, mounted
    finally:
        subprocess.run(["umount", str(mounted)], check=True)


def test_a_registry_on_a_read_only_mount_is_refused_before_training_and_on_promote(checkpoint_file, read_only_folder):
    source, mounted = read_only_folder
    meta = Registry(str(source / "registry")).register(str(checkpoint_file))
    registry = Registry(str(mounted / "registry"))

    with pytest.raises(RegistryError, match=r"^registry '.*/read-only/registry' cannot be written to \(Read-only file "
                                            r"system\)$"):
        registry.check_writable()
    with pytest.raises(RegistryError, match=r"cannot be written to \(Read-only file system: '.*/current.json'\)"):
        registry.promote(meta.version)
    assert registry.current() is None and [found.version for found in registry.versions()] == [meta.version]


def test_an_unknown_version_close_to_a_known_one_is_suggested_and_a_long_list_is_cut(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    versions = [registry.register(str(variant(checkpoint_file, tmp_path / f"v{epoch}.pt", epoch=epoch))).version
                for epoch in range(12)]
    typo = versions[3][:-1]

    with pytest.raises(RegistryError) as raised:
        registry.resolve(typo)

    message = str(raised.value)
    assert f"no version '{typo}'; did you mean {versions[3]}? (known: the 10 newest of 12: " in message
    assert versions[0] not in message.split("known:")[1] and versions[-1] in message
    with pytest.raises(RegistryError) as raised:
        registry.resolve("20000101-000000-deadbeef")
    assert "did you mean" not in str(raised.value)


# --- loading ------------------------------------------------------------------------------


def test_load_gives_the_same_model_as_the_original_file(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file), promote=True)

    checkpoint, loaded_meta = registry.load()

    assert loaded_meta == meta
    original = load_checkpoint(str(checkpoint_file))
    assert checkpoint.model_config == original.model_config
    assert torch.equal(model_output(checkpoint), model_output(original))
    assert registry.checkpoint_url("current") == f"{tmp_path / 'registry'}/{meta.version}/checkpoint.pt"


def test_tampered_checkpoint_is_refused(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file))
    stored = tmp_path / "registry" / meta.version / "checkpoint.pt"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    with pytest.raises(RegistryError, match=rf"'{meta.version}'.*sha256 {meta.checkpoint_sha256[:12]}"):
        registry.load(meta.version)


def test_a_grown_checkpoint_is_refused_having_read_no_more_than_was_registered(checkpoint_file, tmp_path):
    """A checkpoint.pt grown to a gigabyte was read whole before its checksum was found wrong."""
    import tracemalloc

    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file))
    with open(tmp_path / "registry" / meta.version / "checkpoint.pt", "r+b") as stored:
        stored.truncate(2**30)  # the registered bytes, then a hole of zeros
    tracemalloc.start()
    try:
        with pytest.raises(RegistryError, match=rf"'{meta.version}'.*\(more than the {meta.checkpoint_bytes} bytes "
                                                r"registered\): it was modified or corrupted"):
            registry.load(meta.version)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**30 // 8, peak


def test_registry_records_past_their_bound_are_named_not_read(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file), promote=True)
    other = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)))
    with open(tmp_path / "registry" / other.version / "model.json", "r+b") as record:
        record.truncate(2**30)
    versions, unreadable = registry.scan()
    assert [found.version for found in versions] == [meta.version]
    assert "is larger than the 16 MiB that a model.json may take; not read" in unreadable[other.version]
    with open(tmp_path / "registry" / "current.json", "r+b") as record:
        record.truncate(2**30)
    with pytest.raises(RegistryError, match=r"current.json is unreadable \('.*current.json' is larger than the 16 MiB "
                                            r"that a current.json may take; not read\)"):
        registry.current()


# --- object storage -----------------------------------------------------------------------


@pytest.mark.integration
def test_registry_on_s3(checkpoint_file, s3_bucket):
    bucket, options = s3_bucket
    registry = Registry(f"{bucket}/models", options)

    meta = registry.register(str(checkpoint_file))
    registry.promote(meta.version)

    assert [found.version for found in registry.versions()] == [meta.version]
    assert registry.current() == meta.version
    checkpoint, loaded_meta = registry.load("current")
    assert loaded_meta.checkpoint_sha256 == sha256_of(checkpoint_file)
    assert torch.equal(model_output(checkpoint), model_output(load_checkpoint(str(checkpoint_file))))
    assert registry.checkpoint_url(meta.version) == f"{bucket}/models/{meta.version}/checkpoint.pt"


@pytest.mark.integration
def test_an_s3_registry_is_checked_writable_leaving_nothing_and_rolls_back(checkpoint_file, s3_bucket, tmp_path):
    bucket, options = s3_bucket
    registry = Registry(f"{bucket}/models", options)
    registry.check_writable()
    registry.fs.invalidate_cache()
    assert not [path for path in registry.fs.find(registry.root) if ".write-check" in path]  # the probe is gone
    one = registry.register(str(checkpoint_file), promote=True)
    two = registry.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=50)), promote=True)

    assert registry.rollback() == (two.version, one.version)
    assert Registry(f"{bucket}/models", options).current() == one.version
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        Registry("s3://no-such-bucket/models", options).check_writable()


def test_a_registry_in_a_bucket_that_does_not_exist_is_named_so_not_empty(s3_bucket):
    """A misspelt bucket read as an empty registry: 'no models registered', and a flow told the
    operator to train a model."""
    bucket, options = s3_bucket
    registry = Registry(f"{bucket}-missing/models", options)
    for ask in (registry.scan, registry.current):
        with pytest.raises(StorageError, match=rf"'{bucket}-missing/models': the bucket '.*-missing' does not exist"):
            ask()
    assert Registry(f"{bucket}/models", options).scan() == ([], {})  # an existing bucket: an empty registry


@pytest.mark.integration
def test_s3_registry_keeps_the_runs_history_and_pictures(checkpoint_file, s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    written = write_run_files(checkpoint_file.parent)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(f"{checkpoint_file.parent}/", f"{bucket[5:]}/runs/one/", recursive=True)  # a run folder in the bucket
    # Another model there (the same checkpoint registered within the same second is the same version).
    fs.pipe_file(f"{bucket[5:]}/runs/one/best.pt", variant(checkpoint_file, tmp_path / "other.pt", epoch=42).read_bytes())

    from_disk = Registry(f"{bucket}/models", options).register(str(checkpoint_file))
    from_bucket = Registry(f"{bucket}/models", options).register(f"{bucket}/runs/one/best.pt", options)

    for meta in (from_disk, from_bucket):
        assert meta.files == list(RUN_FILES)
        assert {name: fs.cat_file(f"{bucket[5:]}/models/{meta.version}/{name}") for name in RUN_FILES} == written
        listed = json.loads(fs.cat_file(f"{bucket[5:]}/models/{meta.version}/model.json"))["files"]
        assert listed == list(RUN_FILES)
    reader = Registry(f"{bucket}/models", {**options, "skip_instance_cache": True})  # another process
    assert reader.file_url(from_bucket.version, HISTORY_FILE) == f"{bucket}/models/{from_bucket.version}/history.json"
    assert [meta.files for meta in reader.versions()] == [list(RUN_FILES)] * 2


@pytest.mark.integration
def test_s3_registry_sees_versions_registered_elsewhere(checkpoint_file, s3_bucket, tmp_path):
    # Another process registering a model shows up here: a second writer is simulated by a
    # registry whose filesystem is not this process's shared (listing-caching) instance.
    bucket, options = s3_bucket
    here = Registry(f"{bucket}/models", options)
    first = here.register(str(checkpoint_file))
    assert [meta.version for meta in here.versions()] == [first.version]

    elsewhere = Registry(f"{bucket}/models", {**options, "skip_instance_cache": True})
    second = elsewhere.register(str(variant(checkpoint_file, tmp_path / "v.pt", epoch=42)), promote=True)

    assert here.current() == second.version
    assert {meta.version for meta in here.versions()} == {first.version, second.version}
    assert here.load()[1] == second


# --- predictors built from the registry ---------------------------------------------------


def test_predictor_from_registry_carries_the_version_name(checkpoint_file, tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.register(str(checkpoint_file), promote=True)

    predictor = load_predictor(ModelSource(str(tmp_path / "registry"), "current"), CPU)

    assert predictor.model_version == meta.version
    assert load_predictor(ModelSource(str(tmp_path / "registry"), meta.version), CPU).model_version == meta.version


def test_shared_predictor_is_one_per_registry_version_and_settings(checkpoint_file, tmp_path):
    url = str(tmp_path / "registry")
    meta = Registry(url).register(str(checkpoint_file), promote=True)

    first = shared_predictor(ModelSource(url, meta.version), CPU)
    again = shared_predictor(ModelSource(url, meta.version), PredictConfig(device="cpu"))
    other = shared_predictor(ModelSource(url, meta.version), PredictConfig(device="cpu", threshold=0.7))

    assert again is first
    assert other is not first
    assert (first.config.threshold, other.config.threshold) == (0.5, 0.7)
    assert other.model_version == first.model_version == meta.version


# --- the models command -------------------------------------------------------------------


def test_models_list_of_a_registry_folder_that_does_not_exist_says_so(tmp_path, capsys):
    """`models list --registry MISSPELT` said 'no models registered', as of an empty registry. It
    still lists the shipped models, which need no registry."""
    missing = str(tmp_path / "no-such-registry")

    assert main(["models", "list", "--registry", missing]) == 0

    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == (f"registry '{missing}' does not exist; give the folder a registry was made in (--registry, "
                         "or the settings' registry_url): nothing registered there")
    assert "shipped with cellseg (cellseg models show NAME):" in listed
    assert not (tmp_path / "no-such-registry").exists()
    (tmp_path / "empty").mkdir()
    assert main(["models", "list", "--registry", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.startswith(f"no models registered in {tmp_path / 'empty'}\n")


@pytest.mark.parametrize("action", [["show", "20240101-000000-0123abcd"], ["show"], ["export", "--out", "OUT"],
                                    ["promote", "20240101-000000-0123abcd"], ["rollback"]])
def test_models_commands_on_a_registry_folder_that_does_not_exist_say_so(tmp_path, capsys, action):
    """They said "has no version … (known: none)" or "has no current model", as of an empty registry."""
    missing = str(tmp_path / "no-such-registry")
    out = tmp_path / "model.pt"
    arguments = [str(out) if word == "OUT" else word for word in action]

    assert main(["models", *arguments, "--registry", missing]) == 2

    refused = capsys.readouterr()
    assert refused.out == ""
    assert refused.err.splitlines() == [f"cellseg models: error: registry '{missing}' does not exist; give the folder "
                                        "a registry was made in (--registry, or the settings' registry_url)"]
    assert not out.exists() and not (tmp_path / "no-such-registry").exists()


def test_models_show_of_a_shipped_model_needs_no_registry(tmp_path, capsys):
    assert main(["models", "show", "nuclei", "--registry", str(tmp_path / "no-such-registry")]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "nuclei"


@pytest.mark.parametrize("action", [["show", "nucleus"], ["export", "nucleus", "--out", "OUT"]])
def test_models_commands_taking_a_version_suggest_the_shipped_model_a_misspelt_name_means(tmp_path, capsys, action):
    """`models export nucleus` named no shipped model, as `models show nucleus` did."""
    (tmp_path / "registry").mkdir()
    out = tmp_path / "model.pt"
    arguments = [str(out) if word == "OUT" else word for word in action]

    assert main(["models", *arguments, "--registry", str(tmp_path / "registry")]) == 2

    refused = capsys.readouterr()
    assert refused.out == ""
    assert refused.err.splitlines() == [f"cellseg models: error: registry '{tmp_path / 'registry'}' has no version "
                                        "'nucleus' (known: none); did you mean the shipped model 'nuclei'?"]
    assert not out.exists()

