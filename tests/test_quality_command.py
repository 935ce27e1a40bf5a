"""`python -m benchmarks.quality`, the command behind the README's quality table, on synthetic data."""

from __future__ import annotations

import json

from benchmarks.quality import measure
from cellseg.config import PredictConfig
from cellseg.data import pair_images_and_masks, split_train_val


def test_quality_of_a_run_on_its_validation_images(tiny_checkpoint, synthetic_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").symlink_to(tiny_checkpoint)
    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.2, 0)
    (run / "split.json").write_text(json.dumps({"train": [p.id for p in train_pairs], "val": [p.id for p in val_pairs]}))

    summary = measure(synthetic_dataset, run, tmp_path / "quality", PredictConfig(device="cpu"))
    assert summary["images"] == len(val_pairs) == 5
    assert 0.8 < summary["dice"] <= 1.0 and 0.0 <= summary["pixel_error"] < 0.1
    assert 0.0 < summary["f1_mean"] <= 1.0 and 0.0 < summary["dsb_score_mean"] <= summary["f1_mean"]
    assert isinstance(summary["count_error_median"], float)
    saved = json.loads((tmp_path / "quality" / "quality.json").read_text())
    assert saved["summary"] == summary
    assert sorted(row["image_id"] for row in saved["evaluation"]["per_image"]) == sorted(p.id for p in val_pairs)
