"""cellseg.appearance: the kind of a training image, and crops balanced over the kinds."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest

from cellseg.appearance import balanced_counts, image_appearance
from cellseg.config import ModelConfig, NormalizationConfig, TrainConfig
from cellseg.dataset import TrainingDataset
from cellseg.loaded_pairs import load_pairs
from cellseg.pairs import pair_images_and_masks
from cellseg.synth import encode_png, generate_sample
from cellseg.train import train


def textured(sample_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dark-cells image on a background as mottled as a stained section's."""
    image = sample_image.astype(np.float64) * rng.uniform(0.4, 1.0, sample_image.shape)
    return image.astype(np.uint8)


def test_the_kind_of_image_follows_the_cells_contrast_and_the_background_texture():
    rng = np.random.default_rng(0)
    bright, dark = generate_sample(rng, polarity="bright"), generate_sample(rng, polarity="dark")
    assert image_appearance(bright.image, bright.labels) == "fluorescence"
    assert image_appearance(dark.image, dark.labels) == "brightfield"
    assert image_appearance(textured(dark.image, rng), dark.labels) == "tissue"
    # Nothing to compare with: no cells, or cells everywhere.
    assert image_appearance(dark.image, np.zeros_like(dark.labels)) == "fluorescence"
    assert image_appearance(dark.image, np.ones_like(dark.labels)) == "fluorescence"


def shares(counts: list[int], kinds: list[str]) -> dict[str, float]:
    totals = Counter()
    for count, kind in zip(counts, kinds, strict=True):
        totals[kind] += count
    return {kind: total / sum(totals.values()) for kind, total in totals.items()}


def test_rare_kinds_get_their_least_share_and_common_ones_keep_their_crops():
    kinds = ["fluorescence"] * 80 + ["brightfield"] * 16 + ["tissue"] * 4
    counts = [2 + index % 3 for index in range(100)]
    balanced = balanced_counts(counts, kinds, 0.15)
    assert balanced[:96] == counts[:96]  # fluorescence and brightfield are above 15% already
    assert shares(balanced, kinds)["tissue"] == pytest.approx(0.15, abs=0.01)
    assert shares(counts, kinds)["tissue"] < 0.05
    # Two kinds below the share both reach it; fluorescence keeps its crops.
    both = balanced_counts(counts, kinds, 0.3)
    assert both[:80] == counts[:80]
    assert shares(both, kinds)["brightfield"] == pytest.approx(0.3, abs=0.02)
    assert shares(both, kinds)["tissue"] == pytest.approx(0.3, abs=0.02)
    # The share is capped at an equal one, never below an image's own count, and 0 changes nothing.
    assert shares(balanced_counts(counts[80:], kinds[80:], 0.5), kinds[80:])["tissue"] == pytest.approx(0.5, abs=0.03)
    assert balanced_counts(counts, kinds, 0.0) == counts
    assert balanced_counts(counts[:80], kinds[:80], 0.3) == counts[:80]
    with pytest.raises(ValueError, match="3 crop counts for 2 images"):
        balanced_counts([1, 2, 3], ["tissue", "tissue"], 0.2)


@pytest.fixture()
def mixed_folder(tmp_path):
    """Six fluorescence images and one dark-cells image, with 16-bit labels."""
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for index in range(7):
        sample = generate_sample(rng, polarity="dark" if index == 6 else "bright")
        (tmp_path / "images" / f"img{index}.png").write_bytes(encode_png(sample.image))
        (tmp_path / "labels" / f"img{index}.png").write_bytes(encode_png(sample.labels))
    return tmp_path


def test_training_draws_the_rarer_kind_as_often_as_asked(mixed_folder):
    pairs = load_pairs(pair_images_and_masks(str(mixed_folder / "images"), str(mixed_folder / "labels")),
                       NormalizationConfig())
    # Judged on the raw image: normalisation turns the dark cells bright, the kind stays brightfield.
    assert [pair.appearance for pair in pairs] == ["fluorescence"] * 6 + ["brightfield"]
    dark = pairs[6]
    assert dark.image[dark.mask].mean() > dark.image[~dark.mask].mean()
    plain = TrainingDataset(pairs, patch_size=64, patches_per_image=2)
    balanced = TrainingDataset(pairs, patch_size=64, patches_per_image=2, balance_appearance=0.4)
    assert len(plain) == 14
    assert plain.crops_by_appearance() == {"brightfield": 2, "fluorescence": 12}
    assert balanced.crops_by_appearance() == {"brightfield": 8, "fluorescence": 12}
    image, target = balanced[len(balanced) - 1]  # a crop of the dark image, like any other
    assert image.shape == target.shape == (1, 64, 64)


def test_a_balanced_training_run_says_how_it_drew_its_crops(mixed_folder, tmp_path, caplog):
    pairs = load_pairs(pair_images_and_masks(str(mixed_folder / "images"), str(mixed_folder / "labels")),
                       NormalizationConfig())
    config = TrainConfig(epochs=1, patch_size=48, patches_per_image=1, device="cpu", max_minutes=None,
                         init_from=None, balance_appearance=0.25)
    with caplog.at_level(logging.INFO, logger="cellseg.train"):
        result = train(pairs[1:], pairs[:1], tmp_path / "run", ModelConfig(depth=2, base_width=4), config)
    assert "balanced over the kinds of image: brightfield 2, fluorescence 5" in caplog.text
    assert len(result.history) == 1
