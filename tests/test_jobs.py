"""The one recipe of each job (cellseg.jobs), called as the CLI, the flows and the benchmarks call it."""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cellseg.config import BlockConfig, ModelConfig, PredictConfig, TrainConfig
from cellseg.jobs import SegmentJob, TrainJob, run_segmentation, run_training
from cellseg.jobs_plan import even_shards, model_source, pin_model, plan_segmentation
from cellseg.jobs_shards import (
    STOP_GRACE,
    forget_stop_event,
    segment_shard,
    stop_event,
    stopped_when_left_by_an_error,
)
from cellseg.jobs_training import RunFolderError, check_run_dir, kept_line, recorded_sources
from cellseg.registry import Registry, RegistryError
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.synth import encode_png, generate_sample, write_dataset
from cellseg.verify import verify_store

SMALL = ModelConfig(depth=2, base_width=4)
QUICK = TrainConfig(epochs=2, patch_size=64, patches_per_image=1, device="cpu", max_minutes=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    write_dataset(str(root / "data"), count=8, size=64, seed=2)
    job = TrainJob(images_url=str(root / "data/images"), masks_url=str(root / "data/labels"), model=SMALL,
                   training=QUICK, predict=PredictConfig(threshold=0.4))
    return job, run_training(job, root / "run"), root


def test_run_training_leaves_a_complete_run(trained):
    _, outcome, root = trained
    run = root / "run"
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "history.json", "manifest.json", "split.json",
                                                "training_curves.png", "validation_gallery.png"}
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 8 and outcome.val_images == len(split["val"]) == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["hash"] == outcome.dataset_hash == load_checkpoint(str(run / "best.pt")).dataset_manifest_hash
    # label masks: the best checkpoint's cells scored on the validation images
    assert outcome.cells["images"] == 2 and outcome.cells["true_cells_total"] > 0
    summary = outcome.summary()
    assert summary["metrics"]["dice"] == outcome.best_metrics["val_dice"]
    assert summary["metrics"]["cells_f1_mean"] == outcome.cells["f1_mean"]


def test_overwrite_replaces_a_run_that_a_stop_file_ended(trained, tmp_path):
    """STOP ends a run after its epoch, to be resumed; --overwrite starts a new run instead, which
    the old run's STOP must not end before its first epoch ("no epoch was trained")."""
    job, _, _ = trained
    run = tmp_path / "run"
    run_training(job, run)
    (run / "STOP").touch()
    replaced = run_training(job, run, overwrite=True)
    assert len(replaced.result.history) == QUICK.epochs and replaced.result.stop_reason == "max epochs reached"
    assert not (run / "STOP").exists()


def test_an_overwrite_stopped_early_leaves_one_whole_run_never_two_mixed(trained, tmp_path, monkeypatch):
    """An --overwrite stopped (Ctrl-C) before its first epoch ended left the old run's last.pt,
    best.pt and history.json beside the new run's manifest.json and split.json: the stop's line said
    to resume the old run, and that resume then refused the data or went on with the old settings."""
    import cellseg.jobs_training

    job, _, _ = trained
    run = tmp_path / "run"
    run_training(job, run)
    old_manifest = (run / "manifest.json").read_text()

    fewer = job.model_copy(update={"training": QUICK.model_copy(update={"val_fraction": 0.5})})
    # Refused by a check of the new run (a device this machine lacks): the old run stays whole
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_training(fewer.model_copy(update={"training": fewer.training.model_copy(update={"device": "cuda"})}), run,
                     overwrite=True)
    assert (run / "manifest.json").read_text() == old_manifest and (run / "last.pt").is_file()

    def stopped_in_epoch_1(*args, on_start, **kwargs):  # Ctrl-C before the new run wrote anything
        raise KeyboardInterrupt

    monkeypatch.setattr(cellseg.jobs_training, "train", stopped_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        run_training(fewer, run, overwrite=True)
    assert (run / "manifest.json").read_text() == old_manifest  # the old run whole: its resume goes on from it
    assert kept_line(run).startswith(f"{run / 'last.pt'} holds epoch {QUICK.epochs}: ")

    def stopped_as_it_writes(*args, on_start, **kwargs):  # Ctrl-C as the new run writes its first checkpoint
        on_start()
        raise KeyboardInterrupt

    monkeypatch.setattr(cellseg.jobs_training, "train", stopped_as_it_writes)
    with pytest.raises(KeyboardInterrupt):
        run_training(fewer, run, overwrite=True)
    assert not [name for name in ("last.pt", "best.pt", "history.json", "training_curves.png", "validation_gallery.png")
                if (run / name).exists()]
    assert (run / "manifest.json").read_text() != old_manifest  # the new run's
    assert kept_line(run) == "it stopped before its first epoch ended, so nothing was kept"
    with pytest.raises(RunFolderError, match=r"nothing to resume in .*: it holds no last\.pt"):
        check_run_dir(run, resume=True, overwrite=False)


def test_a_resumed_run_keeps_its_split_whatever_seed_or_validation_share_is_given(trained, tmp_path, caplog):
    """`train --resume --seed 3 --val-fraction 0.5` split the images anew: images trained on were
    then scored as validation images, and best.pt compared scores of two splits."""
    from cellseg.cli import main

    job, _, _ = trained
    run = tmp_path / "run"
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 1})}), run)
    split = (run / "split.json").read_text()
    with caplog.at_level("WARNING", logger="cellseg.jobs"):
        assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--seed", "3", "--val-fraction", "0.5",
                     "--quiet"]) == 0
    assert (run / "split.json").read_text() == split
    kept = load_checkpoint(str(run / "last.pt"))
    assert kept.epoch == 2 and (kept.train_config.seed, kept.train_config.val_fraction) == (QUICK.seed,
                                                                                            QUICK.val_fraction)
    assert (f"seed 3, val_fraction 0.5 given, not used: a resumed run keeps the split of its images it began with "
            f"(seed {QUICK.seed}, val_fraction {QUICK.val_fraction}), so that no image it trained on is scored as a "
            "validation image; --overwrite starts afresh with them") in caplog.messages


def test_validation_masks_without_a_cell_are_warned_of(trained, tmp_path, caplog):
    """Their Dice is 0 for any prediction with a cell: best.pt and early stopping followed nothing,
    without a word."""
    job, _, root = trained
    data = tmp_path / "labels"
    shutil.copytree(root / "data/labels", data)
    held_out = json.loads((root / "run" / "split.json").read_text())["val"]
    for image_id in held_out:
        (data / f"{image_id}.png").write_bytes(encode_png(np.zeros((64, 64), np.uint8)))
    with caplog.at_level("WARNING", logger="cellseg.jobs"):
        run_training(job.model_copy(update={"masks_url": str(data), "training": QUICK.model_copy(update={"epochs": 1})}),
                     tmp_path / "run")
    assert (f"none of the {len(held_out)} validation masks ({', '.join(held_out)}) has a cell pixel: any mask with a "
            "cell scores Dice 0 on them, so best.pt and early stopping follow nothing; --seed N holds out other "
            "images, --val-fraction sets how many") in caplog.messages


def test_a_source_without_images_makes_no_store_but_refuses_one_that_could_not_be_written(tmp_path):
    """An empty night made an empty store; then it made none, but passed a store that could never
    be written (a misspelt bucket, a folder that cannot be made) with 'nothing to do'."""
    import zarr

    (tmp_path / "empty").mkdir()

    def planned(store_url: str) -> object:
        return plan_segmentation(SegmentJob(source_url=str(tmp_path / "empty"), store_url=store_url,
                                            model_version="bundled"))

    assert planned(str(tmp_path / "new" / "deeper" / "s.zarr")).pending == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty"]  # nothing made, nothing left
    with pytest.raises(StoreError, match=r"^(cannot create a results store at|cannot write to results store) "
                                         r"'/proc/cellseg\.zarr': "):
        planned("/proc/cellseg.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["owner"] = "another tool"
    with pytest.raises(StoreError, match="is a zarr group but not a cellseg results store; choose a new folder"):
        planned(str(tmp_path / "other.zarr"))
    ResultStore.open(str(tmp_path / "kept.zarr"))
    assert planned(str(tmp_path / "kept.zarr")).pending == 0


@pytest.mark.integration
def test_a_store_in_a_bucket_that_does_not_exist_cannot_be_created(moto_endpoint):
    import s3fs

    from cellseg.store_checks import check_store_creatable

    options = {"endpoint_url": moto_endpoint}
    with pytest.raises(StoreError, match=r"^cannot create a results store at 's3://no-such-bucket/s\.zarr': its "
                                         r"bucket 'no-such-bucket' does not exist$"):
        check_store_creatable("s3://no-such-bucket/s.zarr", options)
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    assert not fs.exists("no-such-bucket")
    fs.mkdir("a-bucket")
    check_store_creatable("s3://a-bucket/s.zarr", options)
    assert not fs.exists("a-bucket/s.zarr")


def test_post_processing_is_logged_with_the_measure_it_was_chosen_by(trained, tmp_path, caplog):
    """Binary masks: the split and threshold are chosen by the adapted Rand error against the masks'
    regions (`choose_postprocessing`), and the log line gives that figure, not a cell F1."""
    job, _, root = trained
    binary = job.model_copy(update={"masks_url": str(root / "data/masks")})
    with caplog.at_level("INFO", logger="cellseg.jobs"):
        run_training(binary, tmp_path / "run")
    (line,) = [record.getMessage() for record in caplog.records if record.getMessage().startswith("post-processing")]
    assert "(validation adapted_rand_error_mean " in line and "f1" not in line


def test_resume_on_other_images_or_masks_is_refused_before_anything_is_replaced(trained, tmp_path):
    """The run's epochs, split and best score would mix two datasets, and its manifest.json and
    split.json be replaced by the new data's."""
    job, _, root = trained
    run = tmp_path / "run"
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 1})}), run)
    manifest, split = (run / "manifest.json").read_bytes(), (run / "split.json").read_bytes()
    other_masks = job.model_copy(update={"masks_url": str(root / "data/masks")})  # binary, not the labels
    with pytest.raises(ValueError, match=r"'.*last\.pt' was trained on dataset [0-9a-f]{12} \(its manifest\.json\), "
                                         r"but these images and masks are dataset [0-9a-f]{12} \(changed since: mask "
                                         rf"'{root}/data/masks/synth_0000\.png', mask '.*synth_0001\.png', mask "
                                         r"'.*synth_0002\.png' and 5 more\): resume with the ones"):
        run_training(other_masks, run, resume=True)
    # A pair gone and another added: named by their ids
    other = tmp_path / "other"
    shutil.copytree(root / "data", other)
    for folder in ("images", "labels"):
        (other / folder / "synth_0007.png").rename(other / folder / "synth_0099.png")
    moved = job.model_copy(update={"images_url": str(other / "images"), "masks_url": str(other / "labels")})
    with pytest.raises(ValueError, match=r"\(1 pair\(s\) added: synth_0099; 1 pair\(s\) gone: synth_0007\)"):
        run_training(moved, run, resume=True)
    assert (run / "manifest.json").read_bytes() == manifest and (run / "split.json").read_bytes() == split
    assert len(run_training(job, run, resume=True).result.history) == QUICK.epochs  # the same data resumes


def test_resume_goes_on_with_the_network_the_run_began_with_without_its_model_settings_again(trained, tmp_path,
                                                                                             caplog):
    """`cellseg train --resume` without the run's --depth/--base-width used to be refused ('holds a
    model built with ...; resume with the run's model settings'); the run's last.pt says them."""
    job, _, _ = trained
    run = tmp_path / "run"
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 1})}), run)
    defaults = job.model_copy(update={"model": ModelConfig()})
    with caplog.at_level("INFO", logger="cellseg.jobs"):
        resumed = run_training(defaults, run, resume=True)
    assert len(resumed.result.history) == QUICK.epochs
    assert load_checkpoint(str(run / "last.pt")).model_config == SMALL
    assert "resuming with the model settings the run began with: base_width 4, depth 2" in caplog.messages
    caplog.clear()
    with caplog.at_level("INFO", logger="cellseg.jobs"):  # one given that differs is named, and not used
        run_training(job.model_copy(update={"model": ModelConfig(depth=3),
                                            "training": QUICK.model_copy(update={"epochs": 3})}), run, resume=True)
    assert ("resuming with the model settings the run began with: base_width 4, depth 2 (given: depth 3, not used: "
            "a resumed run keeps its network)" in caplog.messages)


def test_resume_goes_on_with_the_runs_training_settings_and_images_under_those_given(trained, tmp_path, caplog):
    """`cellseg train --resume --out RUN` needed the run's images, masks and training settings again,
    or went on with the command's defaults (60 epochs, 256-pixel crops); now it needs none of them,
    and a flag given (--epochs) changes the one setting it names."""
    from cellseg.cli import main

    job, _, _ = trained
    run = tmp_path / "run"
    began = QUICK.model_copy(update={"epochs": 1, "patch_size": 48, "learning_rate": 5e-4,
                                       "augmentation": QUICK.augmentation.model_copy(update={"noise_std": 0.07})})
    relative = job.model_copy(update={"training": began, "images_url": os.path.relpath(job.images_url),
                                      "masks_url": os.path.relpath(job.masks_url)})
    run_training(relative, run)
    assert recorded_sources(run) == (job.images_url, job.masks_url)  # absolute: a resume from elsewhere finds them

    with caplog.at_level("INFO", logger="cellseg.jobs"):
        assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--quiet"]) == 0
    kept = load_checkpoint(str(run / "last.pt"))
    assert kept.epoch == 2 and kept.model_config == SMALL
    # The run's settings under --epochs; where it runs (device) is this command's
    assert kept.train_config == began.model_copy(update={"epochs": 2, "init_from": None, "device": "auto"})
    assert kept.train_config.augmentation.noise_std == 0.07
    assert any(message.startswith("resuming with the training settings the run began with: ") and
               "learning_rate 0.0005" in message and "patch_size 48" in message and "epochs" not in message
               for message in caplog.messages), caplog.messages

    # A settings file written for new runs does not change the run (it went on with 256-pixel crops)
    settings = tmp_path / "settings.yaml"
    settings.write_text("training:\n  patch_size: 256\n  learning_rate: 0.01\n  device: cpu\n")
    caplog.clear()
    with caplog.at_level("INFO", logger="cellseg.jobs"):
        assert main(["train", "--config", str(settings), "--resume", "--out", str(run), "--epochs", "3", "--quiet"]) == 0
    kept = load_checkpoint(str(run / "last.pt"))
    assert kept.epoch == 3 and (kept.train_config.patch_size, kept.train_config.learning_rate) == (48, 5e-4)
    assert "resuming with training settings given over the run's: epochs 3 (the run's: epochs 2)" in caplog.messages

    # Settings given explicitly (here a nested one) go over the run's; the rest stay the run's.
    given = TrainConfig(epochs=4, augmentation={"noise_std": 0.01})
    resumed = run_training(job.model_copy(update={"training": given}), run, resume=True)
    kept = load_checkpoint(str(run / "last.pt")).train_config
    assert len(resumed.result.history) == 4 and (kept.patch_size, kept.learning_rate) == (48, 5e-4)
    assert kept.augmentation == began.augmentation.model_copy(update={"noise_std": 0.01})


def test_resume_without_images_names_what_is_missing_from_the_run(trained, tmp_path, capsys):
    from cellseg.cli import main

    job, _, _ = trained
    assert main(["train", "--out", str(tmp_path / "new")]) == 2
    assert "--images and --masks are needed to start a run (only --resume takes the run's own)" in capsys.readouterr().err
    run = tmp_path / "run"
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 1})}), run)
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "images_url": "s3://bucket/x?X-Amz-Signature=********"}))
    with pytest.raises(RunFolderError, match=r"records the run's images and masks with their credentials masked; "
                                             r"give the run's --images and --masks"):
        recorded_sources(run)
    (run / "manifest.json").write_text(json.dumps({**manifest, "images_url": str(tmp_path / "moved")}))
    with pytest.raises(RunFolderError, match=r"the run's images folder '.*moved', which '.*manifest.json' records, "
                                             r"does not exist here \(moved, or on another machine\); give the run's"):
        recorded_sources(run)
    del manifest["masks_url"]  # a run of an earlier version
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2"]) == 2
    assert "manifest.json' has no 'masks_url': it does not say which images" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--epochs", "2", "--images", job.images_url, "--masks",
                 job.masks_url, "--quiet"]) == 0


def test_a_run_folder_is_refused_in_a_store_or_around_its_own_data_and_an_ended_run_is_not_resumed(trained, tmp_path,
                                                                                                      capsys):
    """A run's files inside a results store read back there as broken images; around its own data
    (`--out data` for data/images) its pictures were later segmented as cell images; and a run that
    had run all its epochs, resumed, loaded its data to train none."""
    job, _, root = trained
    ResultStore.open(str(tmp_path / "r.zarr"))
    for out, where in ((tmp_path / "r.zarr", "is"), (tmp_path / "r.zarr" / "run", "is inside")):
        with pytest.raises(RunFolderError, match=rf"training folder '{out}' {where} the zarr store '{tmp_path}/r.zarr'"):
            run_training(job, out)
    with pytest.raises(RunFolderError, match=rf"training folder '{root}/data' holds the run's images "
                                             r"\('.*/data/images'\): its checkpoints and pictures"):
        run_training(job, root / "data")
    assert not (root / "data" / "best.pt").exists()

    run = tmp_path / "run"
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 1})}), run)
    from cellseg.cli import main

    assert main(["train", "--resume", "--out", str(run)]) == 2
    assert (f"the run in '{run}' has ended: its last.pt holds epoch 1 of 1; resume with --epochs N (N above 1) to "
            "train it longer") in capsys.readouterr().err
    # The library goes on to finish it (`make nuclei-model` resumes an ended run to install it)
    assert len(run_training(job.model_copy(update={"training": TrainConfig()}), run, resume=True).result.history) == 1


def test_the_kept_line_names_the_epoch_last_pt_holds_whatever_history_json_says(trained, tmp_path):
    """history.json is written after last.pt: read between the two, it named the epoch before."""
    job, _, _ = trained
    run = tmp_path / "run"
    assert kept_line(run) == "it stopped before its first epoch ended, so nothing was kept"  # a user's --out stays
    assert kept_line(run, own_folder=True).endswith(f"nothing was kept ({run} can go)")
    run_training(job.model_copy(update={"training": QUICK.model_copy(update={"epochs": 2})}), run)
    history = json.loads((run / "history.json").read_text())
    (run / "history.json").write_text(json.dumps(history[:1]))
    assert kept_line(run) == (f"{run}/last.pt holds epoch 2: `cellseg train --resume --out {run}` goes on from it, "
                              "on the run's images and masks with its settings (--epochs N to train it longer)")
    # A fine-tune stopped before its first epoch ended: best.pt holds the starting weights it scored,
    # and the line said nothing was kept while the folder refused the same command again.
    started = tmp_path / "started"
    started.mkdir()
    (started / "best.pt").write_bytes((run / "best.pt").read_bytes())  # stopped between best.pt and last.pt
    assert kept_line(started) == (f"it stopped as its first epoch was saved: {started}/best.pt holds epoch "
                                  f"{load_checkpoint(str(run / 'best.pt')).epoch}, but no last.pt to resume from; the "
                                  "same command with --overwrite starts it again")
    save_checkpoint(dataclasses.replace(load_checkpoint(str(run / "best.pt")), epoch=0), str(started / "best.pt"))
    assert kept_line(started) == (f"it stopped before its first epoch ended: {started}/best.pt holds only its starting "
                                  "weights, nothing to resume; the same command with --overwrite starts it again")
    with pytest.raises(RunFolderError, match="already holds a training run"):
        check_run_dir(started, resume=False, overwrite=False)
    assert check_run_dir(started, resume=False, overwrite=True) == started


def test_run_segmentation_segments_once_and_skips_done_images(trained, tmp_path):
    _, outcome, root = trained
    job = SegmentJob(source_url=str(root / "data/images"), store_url=str(tmp_path / "s.zarr"),
                     checkpoint_url=str(outcome.best_checkpoint), predict=PredictConfig(threshold=0.4))
    images, planned = [], []
    report = run_segmentation(job, on_plan=planned.append, on_image=images.append)
    assert len(report.done) == 8 and report.failed == [] and planned == [8] and len(images) == 8
    record = ResultStore.open(job.store_url, mode="r").record("synth_0000")
    # The settings as used: what the model decided at training time fills in the undecided ones.
    checkpoint = load_checkpoint(str(outcome.best_checkpoint))
    decided = {"split_touching": checkpoint.split_touching, "centre_prominence": checkpoint.centre_prominence}
    assert record["model"]["predict"] == job.predict.model_copy(update=decided).model_dump(mode="json")
    assert record["model"]["predict"]["threshold"] == 0.4  # stated in the job
    assert record["model"]["checkpoint"] == job.checkpoint_url
    again = run_segmentation(job)
    assert again.done == [] and sorted(again.skipped) == sorted(report.done)


def shard_job(trained, store: Path, **fields) -> SegmentJob:
    _, outcome, root = trained
    return SegmentJob(source_url=str(root / "data/images"), store_url=str(store), shard_size=2,
                      checkpoint_url=str(outcome.best_checkpoint), predict=PredictConfig(threshold=0.4), **fields)


def test_run_segmentation_runs_its_shards_side_by_side_and_reports_them_as_one(trained, tmp_path):
    heard: list[tuple[str, str]] = []
    inside: list[str] = []
    overlapping: list[str] = []

    def image_done(image_id: str) -> None:  # would overlap if two shard threads called it at once
        if inside:
            overlapping.append(image_id)
        inside.append(image_id)
        time.sleep(0.02)
        heard.append((threading.current_thread().name, image_id))
        inside.pop()

    job = shard_job(trained, tmp_path / "side.zarr")
    report = run_segmentation(job, on_image=image_done)
    assert sorted(report.done) == sorted(image_id for _, image_id in heard) and len(report.done) == 8
    assert {thread for thread, _ in heard} == {"cellseg-shard-0", "cellseg-shard-1"}  # four shards, two threads
    assert overlapping == []
    assert report.summary()["cpu_ms_per_image"]["model"] > 0 and report.pixels == 8 * 64 * 64
    # The same results as one shard after another in the calling thread.
    alone = run_segmentation(shard_job(trained, tmp_path / "alone.zarr", max_parallel_shards=1))
    assert sorted(alone.done) == sorted(report.done)
    side, one = ResultStore.open(job.store_url, mode="r"), ResultStore.open(str(tmp_path / "alone.zarr"), mode="r")
    for image_id in report.done:
        assert (side.read_mask(image_id) == one.read_mask(image_id)).mean() > 0.999


def test_a_shard_that_fails_stops_the_others_and_its_error_is_raised(trained, tmp_path):
    heard: list[str] = []

    def image_done(image_id: str) -> None:
        heard.append(image_id)
        if len(heard) == 2:
            raise RuntimeError("the caller's callback failed")

    job = shard_job(trained, tmp_path / "s.zarr")
    with pytest.raises(RuntimeError, match="callback failed"):
        run_segmentation(job, on_image=image_done)
    written = ResultStore.open(job.store_url, mode="r").done_among([f"synth_{index:04d}" for index in range(8)])
    assert 2 <= len(written) < 8  # the other shard stopped, the queued ones never started
    again = run_segmentation(job)
    assert sorted(again.skipped) == sorted(written) and len(again.done) == 8 - len(written)


def test_an_interrupted_run_stops_its_shards_and_keeps_what_they_wrote(trained, tmp_path):
    job = shard_job(trained, tmp_path / "s.zarr")
    heard: list[str] = []

    def interrupt_at_the_second_image(image_id: str) -> None:
        heard.append(image_id)
        if len(heard) == 2:
            _thread.interrupt_main()  # Ctrl-C, as the calling thread gets it
            time.sleep(1.0)  # the other shard waits here to report its next image, as a slower one would

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_segmentation(job, on_image=interrupt_at_the_second_image)
    assert time.monotonic() - started < STOP_GRACE
    store = ResultStore.open(job.store_url, mode="r")
    written = store.done_among([f"synth_{index:04d}" for index in range(8)])
    assert 2 <= len(written) < 8 and set(heard) <= written
    assert verify_store(job.store_url, read_data=True).broken == []
    again = run_segmentation(job)
    assert sorted(again.skipped) == sorted(written) and len(again.done) == 8 - len(written)


def test_a_shard_that_starts_after_its_run_was_interrupted_stops_at_once(trained, tmp_path):
    """A segment-images shard looks its stop event up when its task starts; one still starting when
    Ctrl-C came found none on a loaded CI machine, and the interrupted run waited a minute for it
    to segment its whole shard."""
    job = shard_job(trained, tmp_path / "s.zarr")
    with pytest.raises(KeyboardInterrupt), stopped_when_left_by_an_error("run-1"):
        assert not stop_event("run-1").is_set()
        raise KeyboardInterrupt
    late = stop_event("run-1")
    assert late is not None and late.is_set()
    shard = plan_segmentation(job).shards[0]
    report = segment_shard(job, shard, stop=late)
    assert report.done == [] and not ResultStore.open(job.store_url, mode="r").done_among([i for i, _ in shard])
    forget_stop_event("run-1")  # as the flow does once its runner has waited for the shards
    assert stop_event("run-1") is None
    with stopped_when_left_by_an_error("run-2"):  # a run that ends well leaves nothing behind
        pass
    assert stop_event("run-2") is None


def test_a_missing_model_fails_before_the_store_is_created(trained, tmp_path):
    _, _, root = trained
    job = SegmentJob(source_url=str(root / "data/images"), store_url=str(tmp_path / "s.zarr"),
                     checkpoint_url=str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match=r"absent\.pt"):
        run_segmentation(job)
    registry = SegmentJob(source_url=job.source_url, store_url=job.store_url, registry_url=str(tmp_path / "empty"))
    with pytest.raises(RegistryError):
        run_segmentation(registry)
    assert not (tmp_path / "s.zarr").exists()


def test_a_missing_source_or_a_refused_store_fails_before_the_model_is_loaded(trained, tmp_path):
    _, _, root = trained
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")  # loading it would fail: these errors come first
    (tmp_path / "a_file").write_text("mine")
    missing = SegmentJob(source_url=str(tmp_path / "no_images"), store_url=str(tmp_path / "s.zarr"),
                         checkpoint_url=str(damaged))
    with pytest.raises(FileNotFoundError, match="no_images' does not exist"):
        run_segmentation(missing)
    refused = missing.model_copy(update={"source_url": str(root / "data/images"), "store_url": str(tmp_path / "a_file")})
    with pytest.raises(StoreError, match="a_file' is a file"):
        run_segmentation(refused)
    assert (tmp_path / "a_file").read_text() == "mine"
    with pytest.raises(CheckpointError, match=r"damaged\.pt"):
        run_segmentation(refused.model_copy(update={"store_url": str(tmp_path / "s.zarr")}))
    assert not (tmp_path / "s.zarr").exists()


def test_pin_model_fixes_current_to_the_version_it_names(trained, tmp_path):
    _, outcome, root = trained
    registry = Registry(str(tmp_path / "registry"))
    first = registry.register(str(outcome.best_checkpoint), promote=True).version
    job = SegmentJob(source_url=str(root / "data/images"), store_url=str(tmp_path / "s.zarr"),
                     registry_url=registry.url)
    pinned = pin_model(job)
    assert pinned.model_version == first
    assert model_source(pinned).location() == registry.checkpoint_url(first)
    plan = plan_segmentation(pinned.model_copy(update={"shard_size": 3}))
    # 8 images in shards of at most 3 for two workers: four even shards, not 3, 3 and a last 2 alone.
    assert [len(shard) for shard in plan.shards] == [2, 2, 2, 2] and plan.skipped == [] and plan.rejected == []
    assert np.all([image_id.startswith("synth_") for shard in plan.shards for image_id, _ in shard])


@pytest.mark.parametrize(("images", "shard_size", "parallel", "sizes"), [
    (200, 32, 2, [25] * 8),             # not six of 32 and a last 8 running alone
    (240, 60, 2, [60] * 4),             # already even: unchanged
    (10, 4, 2, [3, 3, 2, 2]),           # differ by one image at most, the larger first
    (7, 32, 2, [4, 3]),                 # fewer images than a shard: one shard per worker
    (3, 32, 4, [1, 1, 1]),              # fewer images than workers: one image per shard
    (1, 1, 1, [1]),
    (0, 32, 2, []),
])
def test_even_shards_keep_order_and_give_every_worker_a_full_last_round(images, shard_size, parallel, sizes):
    pairs = [(f"image_{index}", f"/data/image_{index}.png") for index in range(images)]
    shards = even_shards(pairs, shard_size, parallel)
    assert [len(shard) for shard in shards] == sizes
    assert [pair for shard in shards for pair in shard] == pairs
    assert all(len(shard) <= shard_size for shard in shards)


def test_a_checkpoint_rewritten_between_runs_is_loaded_afresh(trained, tmp_path):
    import shutil

    _, outcome, root = trained
    checkpoint = tmp_path / "model.pt"
    shutil.copyfile(outcome.best_checkpoint, checkpoint)
    job = SegmentJob(source_url=str(root / "data/images"), store_url=str(tmp_path / "a.zarr"),
                     checkpoint_url=str(checkpoint))
    first = run_segmentation(job)
    shutil.copyfile(root / "run" / "last.pt", checkpoint)  # another model under the same name
    second = run_segmentation(job.model_copy(update={"store_url": str(tmp_path / "b.zarr")}))
    versions = {ResultStore.open(url, mode="r").record("synth_0000")["model"]["version"]
                for url in (str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"))}
    assert len(first.done) == len(second.done) == 8 and len(versions) == 2
    assert pin_model(job).model_version in versions


# Where training starts: the shipped model for small datasets like its own, unless told otherwise ----------------


def _inverted_masks(root):
    """The synthetic dataset's masks turned inside out: a task unlike the shipped model's nuclei
    (its cells are the background here), as EM membranes are."""
    from PIL import Image

    (root / "inverted").mkdir()
    for path in (root / "masks").iterdir():
        Image.fromarray(((np.asarray(Image.open(path)) == 0) * 255).astype(np.uint8)).save(root / "inverted" / path.name)
    return root / "inverted"


def test_small_datasets_fine_tune_the_shipped_model_when_it_already_knows_their_cells(tmp_path):
    from cellseg.bundled import shipped_checkpoint
    from cellseg.pairs import pair_images_and_masks, split_train_val
    from cellseg.starting_point import FINE_TUNE_MAX_IMAGES, FINE_TUNE_MIN_DICE, choose_start

    write_dataset(str(tmp_path), count=8, size=128, seed=6)
    job = TrainJob(images_url=str(tmp_path / "images"), masks_url=str(tmp_path / "labels"),
                   training=TrainConfig(device="cpu"))
    val = split_train_val(pair_images_and_masks(job.images_url, job.masks_url), 0.25, 0)[1]
    nuclei = choose_start(job, 8, val)
    assert nuclei.checkpoint == shipped_checkpoint() and nuclei.shipped_dice > 0.9
    assert nuclei.described().startswith("fine-tuned from the shipped 'nuclei' model")

    unlike = job.model_copy(update={"masks_url": str(_inverted_masks(tmp_path))})
    unlike_val = split_train_val(pair_images_and_masks(unlike.images_url, unlike.masks_url), 0.25, 0)[1]
    other = choose_start(unlike, 8, unlike_val)
    assert other.checkpoint is None and other.shipped_dice < FINE_TUNE_MIN_DICE
    assert "below" in other.described()

    assert choose_start(job, 8, []).checkpoint == shipped_checkpoint()  # nothing to check it on: the count decides
    # Validation masks without a cell: Dice 0 for any prediction with one, which rejected the shipped model
    blank = tmp_path / "blank"
    shutil.copytree(tmp_path / "labels", blank)
    for pair in val:
        (blank / Path(pair.mask_url).name).write_bytes(encode_png(np.zeros((128, 128), np.uint8)))
    blank_val = split_train_val(pair_images_and_masks(job.images_url, str(blank)), 0.25, 0)[1]
    unjudged = choose_start(job.model_copy(update={"masks_url": str(blank)}), 8, blank_val)
    assert unjudged.checkpoint == shipped_checkpoint() and unjudged.shipped_dice is None
    assert "no cell in the validation masks" in unjudged.described()
    assert choose_start(job, FINE_TUNE_MAX_IMAGES, val).shipped_dice is None  # enough data: no scoring
    assert choose_start(job, FINE_TUNE_MAX_IMAGES, val).checkpoint is None
    assert choose_start(job.model_copy(update={"model": SMALL}), 8, val).checkpoint is None  # an architecture of its own
    scratch = job.model_copy(update={"training": TrainConfig(init_from=None)})
    assert choose_start(scratch, 8, val).checkpoint is None
    general = job.model_copy(update={"training": TrainConfig(init_from="general")})
    assert choose_start(general, 5000, val).checkpoint == shipped_checkpoint("general")
    named = job.model_copy(update={"training": TrainConfig(init_from=str(tmp_path / "x.pt"))})
    assert choose_start(named, 8, val).checkpoint == str(tmp_path / "x.pt")


def test_cellseg_train_starts_from_scratch_on_images_unlike_the_shipped_models_and_resumes_so(tmp_path, caplog):
    import logging

    from cellseg.cli import main

    write_dataset(str(tmp_path / "data"), count=4, size=64, seed=6)
    common = ["train", "--images", str(tmp_path / "data/images"), "--masks", str(_inverted_masks(tmp_path / "data")),
              "--patch-size", "64", "--device", "cpu", "--val-fraction", "0.25", "--out", str(tmp_path / "run")]
    with caplog.at_level(logging.INFO, logger="cellseg"):
        assert main([*common, "--epochs", "1"]) == 0
    assert "training from scratch" in caplog.text
    first = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert first.train_config.init_from is None and first.model_config == ModelConfig()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cellseg"):
        assert main([*common, "--epochs", "2", "--resume"]) == 0
    assert "scoring the shipped" not in caplog.text  # the start of the run is kept, not decided again
    resumed = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert resumed.epoch == 2 and resumed.train_config.init_from is None


def test_cellseg_train_fine_tunes_the_shipped_model_and_from_scratch_opts_out(tmp_path, caplog):
    import logging

    from cellseg.bundled import shipped_checkpoint
    from cellseg.cli import main

    write_dataset(str(tmp_path / "data"), count=4, size=64, seed=6)
    common = ["train", "--images", str(tmp_path / "data/images"), "--masks", str(tmp_path / "data/labels"),
              "--epochs", "1", "--patch-size", "64", "--device", "cpu", "--val-fraction", "0.25"]
    with caplog.at_level(logging.INFO, logger="cellseg"):
        assert main([*common, "--out", str(tmp_path / "tuned")]) == 0
    assert "fine-tuning the shipped" in caplog.text
    shipped = load_checkpoint(shipped_checkpoint())
    tuned = load_checkpoint(str(tmp_path / "tuned" / "best.pt"))
    assert tuned.model_config == shipped.model_config
    assert tuned.train_config.init_from == shipped_checkpoint()
    assert any(not np.array_equal(tuned.state_dict[k], shipped.state_dict[k]) for k in shipped.state_dict)

    assert main([*common, "--out", str(tmp_path / "scratch"), "--from-scratch"]) == 0
    scratch = load_checkpoint(str(tmp_path / "scratch" / "best.pt"))
    assert scratch.train_config.init_from is None and scratch.model_config == ModelConfig()


def test_a_large_image_another_run_finishes_meanwhile_is_reported_skipped(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "large.tif", generate_sample(np.random.default_rng(4), (700, 640)).image)
    job = SegmentJob(source_url=str(folder), store_url=str(tmp_path / "s.zarr"), model_version="general",
                     predict=PredictConfig(threads=1, blocks=BlockConfig(above_pixels=512 * 512, block_size=512)))
    inner: list = []
    # Between this run's plan and its blocks, another run segments the same image.
    report = run_segmentation(job, on_plan=lambda pending: inner.append(run_segmentation(job)))
    assert inner[0].done == ["large"] and inner[0].pixels == 700 * 640
    assert report.done == [] and report.skipped == ["large"] and report.failed == []
    assert ResultStore.open(job.store_url, mode="r").done_ids() == {"large"}


def test_a_run_stopped_before_its_first_epoch_ended_is_offered_only_what_works(tmp_path):
    """A STOP file can end a fine-tuning run before epoch 1 is saved to last.pt: it leaves best.pt
    (the starting weights) and no last.pt, so --resume, once offered, could only fail."""
    (tmp_path / "best.pt").write_bytes(b"starting weights")
    with pytest.raises(RunFolderError, match=r"holds a training run \(best\.pt\).*; replace it \(--overwrite\)") as error:
        check_run_dir(tmp_path, resume=False, overwrite=False)
    assert "--resume" not in str(error.value)
    with pytest.raises(RunFolderError, match=r"holds no last\.pt; start afresh there with --overwrite"):
        check_run_dir(tmp_path, resume=True, overwrite=False)
    assert check_run_dir(tmp_path, resume=False, overwrite=True) == tmp_path
    (tmp_path / "last.pt").write_bytes(b"an epoch")
    with pytest.raises(RunFolderError, match=r"continue it \(--resume\), replace it \(--overwrite\)"):
        check_run_dir(tmp_path, resume=False, overwrite=False)
