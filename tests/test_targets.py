"""Targets that keep touching cells apart, the U-Net border weight map, and their use in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from cellseg.config import AugmentationConfig, NormalizationConfig
from cellseg.dataset import TrainingDataset, TrainingTarget
from cellseg.loaded_pairs import LoadedPair, load_pair
from cellseg.losses import segmentation_loss
from cellseg.pairs import ImagePair
from cellseg.stats import label_cells
from cellseg.targets import border_weight_map, normalised_distance, separated_target

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def touching_pair() -> np.ndarray:
    """Two 6x6 squares side by side (labels 1 and 2) and a separate one (label 3)."""
    labels = np.zeros((16, 24), dtype=np.int32)
    labels[2:8, 2:8] = 1
    labels[2:8, 8:14] = 2
    labels[10:14, 18:22] = 3
    return labels


def test_touching_cells_get_a_one_pixel_gap_and_nothing_else_changes():
    labels = touching_pair()
    target = separated_target(labels)
    _components, count = ndimage.label(target, structure=EIGHT_CONNECTED)
    assert count == 3
    removed = (labels > 0) & ~target
    assert removed.sum() == 6  # one column of the higher-numbered cell, where it touches the other
    assert np.all(removed[2:8, 8])
    assert target[labels == 3].all()


def test_diagonal_contact_is_cut_too_and_a_plain_mask_is_unchanged():
    labels = np.zeros((6, 6), dtype=np.int32)
    labels[0:3, 0:3] = 1
    labels[3:6, 3:6] = 2
    assert ndimage.label(separated_target(labels), structure=EIGHT_CONNECTED)[1] == 2
    binary = (touching_pair() > 0).astype(np.int32) * 255
    np.testing.assert_array_equal(separated_target(binary), binary > 0)
    assert not separated_target(np.zeros((4, 4), dtype=np.int32)).any()


def _brute_force_weights(mask: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    distances = np.sort(np.stack([ndimage.distance_transform_edt(labels != k) for k in range(1, count + 1)]), axis=0)
    weights = 1 + w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    return np.where(mask, 1.0, weights)


def test_border_weights_match_the_u_net_formula():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), dtype=bool)
    for _ in range(7):
        y, x, r = rng.integers(6, 58), rng.integers(6, 58), rng.integers(3, 7)
        yy, xx = np.ogrid[:64, :64]
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= r * r
    mask[:, :24] = False
    mask[50:60, 2:10] = mask[50:60, 12:20] = True  # two cells two pixels apart
    expected = _brute_force_weights(mask, w0=10, sigma=5)
    weights = border_weight_map(mask, 10, 5)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, atol=5e-3)  # the windowed terms drop only tails < 3e-4 * w0
    # In the gap: d1 = 1 and d2 = 2, so 1 + 10 exp(-9 / 50).
    assert weights[55, 10] == pytest.approx(1 + 10 * np.exp(-9 / 50), rel=1e-5)


def test_no_weights_without_a_second_cell_or_with_weight_zero():
    one_cell = np.zeros((20, 20), dtype=bool)
    one_cell[5:10, 5:10] = True
    assert np.all(border_weight_map(one_cell, 10) == 1)
    assert np.all(border_weight_map(separated_target(touching_pair()), 0) == 1)


def test_weighted_loss_is_the_mean_of_weighted_terms():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    weights = torch.tensor([[[[1.0, 3.0], [1.0, 1.0]]]])
    plain = segmentation_loss(logits, targets)
    assert segmentation_loss(logits, targets, weights=torch.ones_like(targets)) == pytest.approx(plain.item())
    terms = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (terms * weights).mean()
    assert segmentation_loss(logits, targets, weights=weights).item() == pytest.approx(expected.item())


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def test_sixteen_bit_masks_are_instance_labels_and_eight_bit_masks_binary(tmp_path):
    image = (np.arange(16 * 24).reshape(16, 24) % 251).astype(np.uint8)
    labels = touching_pair().astype(np.uint16)
    pair = ImagePair("a", _save(tmp_path / "a.png", image), _save(tmp_path / "a_labels.png", labels))
    loaded = load_pair(pair, NormalizationConfig())
    np.testing.assert_array_equal(loaded.instances, labels)
    np.testing.assert_array_equal(loaded.mask, labels > 0)
    binary = ImagePair("b", pair.image_url, _save(tmp_path / "b_mask.png", (labels > 0).astype(np.uint8) * 255))
    assert load_pair(binary, NormalizationConfig()).instances is None


def test_training_targets_carry_gaps_and_weights_through_crops_and_augmentation():
    labels = np.zeros((48, 48), dtype=np.int32)
    labels[4:20, 4:20], labels[4:20, 20:36], labels[26:44, 10:30] = 1, 2, 3
    image = (labels > 0).astype(np.float32)
    pair = LoadedPair(ImagePair("a", "a.png", "a_mask.png"), image, labels > 0, "0", "0", "uint8", labels)
    plain = TrainingDataset([pair], patch_size=48, augment=False)
    _, target = plain[0]
    assert target.shape == (1, 48, 48)
    assert ndimage.label(target[0].numpy() > 0, structure=EIGHT_CONNECTED)[1] == 3

    weighted = TrainingDataset([pair], patch_size=32, patches_per_image=8, augment=True, seed=1,
                          augmentation=AugmentationConfig.strong(), border_weight=10)
    for epoch in (1, 2):
        weighted.set_epoch(epoch)
        for index in range(len(weighted)):
            crop, target = weighted[index]
            assert crop.shape == (1, 32, 32) and target.shape == (2, 32, 32)
            cells, weights = target[0].numpy(), target[1].numpy()
            assert set(np.unique(cells)) <= {0.0, 1.0}
            assert np.all(weights >= 1) and np.all(weights[cells == 1] == 1)  # weights only on background
    # Validation items stay the plain union mask.
    _, val_target = TrainingDataset([pair])[0]
    np.testing.assert_array_equal(val_target[0].numpy() > 0, labels > 0)


def test_normalised_distance_peaks_at_one_in_every_cell_and_dips_where_cells_touch():
    labels = touching_pair()
    distance = normalised_distance(labels)
    assert distance.dtype == np.float32
    assert np.all(distance[labels == 0] == 0) and np.all(distance[labels > 0] > 0)
    for index in (1, 2, 3):
        assert distance[labels == index].max() == pytest.approx(1.0)
    # Pixels on either side of the line where cells 1 and 2 meet are as low as an outline.
    assert distance[4, 7] == distance[4, 8] == distance[4, 2]
    assert distance[4, 7] < 0.5 * distance[4, 5]


def test_distance_targets_follow_the_crop_and_augmentation_and_unpack_by_layout():
    labels = np.zeros((48, 48), dtype=np.int32)
    labels[4:20, 4:20], labels[4:20, 20:36], labels[26:44, 10:30] = 1, 2, 3
    image = (labels > 0).astype(np.float32)
    pair = LoadedPair(ImagePair("a", "a.png", "a_mask.png"), image, labels > 0, "0", "0", "uint8", labels)
    dataset = TrainingDataset([pair], patch_size=32, patches_per_image=8, augment=True, seed=3,
                         augmentation=AugmentationConfig.flips_only(), border_weight=10, distance_map=True)
    assert dataset.layout == TrainingTarget(weighted=True, distance_map=True)
    maxima = 0
    for index in range(len(dataset)):
        crop, target = dataset[index]
        assert target.shape == (3, 32, 32)
        cells, weights, distance = (channel[0, 0].numpy() for channel in dataset.layout.unpack(target[None]))
        assert np.all(weights >= 1) and np.all(weights[cells == 1] == 1)
        assert np.all((distance >= 0) & (distance <= 1))
        # The image is the cells' union: the map is flipped and rotated with it, pixel for pixel.
        np.testing.assert_array_equal(distance > 0, crop[0].numpy() > 0)
        assert np.all(distance[cells == 1] > 0)
        maxima += int((distance == 1).any())
    assert maxima > 0
    strong = TrainingDataset([pair], patch_size=32, patches_per_image=4, augment=True, seed=3,
                        augmentation=AugmentationConfig.strong(), distance_map=True)
    for index in range(len(strong)):
        _, target = strong[index]
        assert target.shape == (2, 32, 32) and strong.layout.unpack(target[None])[1] is None
        assert torch.all((target[1] >= 0) & (target[1] <= 1))
    # Without instance labels the distance comes from the mask's connected components.
    binary = LoadedPair(ImagePair("b", "b.png", "b_mask.png"), image, labels > 0, "0", "0", "uint8", None)
    _, target = TrainingDataset([binary], patch_size=48, distance_map=True)[0]
    assert target.shape == (2, 48, 48)
    merged = target[1].numpy()
    np.testing.assert_allclose(merged, normalised_distance(label_cells(labels > 0)[0]))
    assert merged[11, 19] == merged[11, 20] == pytest.approx(1.0)  # cells 1 and 2 as one: no dip where they meet
    assert normalised_distance(labels)[11, 19] < 0.2
