"""Batched prediction, thresholding, and the Predictor on a small trained checkpoint."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cellseg.checkpoint import Checkpoint, CheckpointError, checkpoint_digest, load_checkpoint
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.infer import Predictor, predict_outputs, predict_probabilities
from cellseg.io import list_images, read_image, read_mask
from cellseg.metrics import mask_agreement
from cellseg.model import UNet
from cellseg.postprocess import threshold_probabilities


def small_unet(dropout: float = 0.0) -> UNet:
    torch.manual_seed(0)
    return UNet(ModelConfig(depth=2, base_width=4, dropout=dropout)).eval()


def random_images(shapes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random(shape, dtype=np.float32) for shape in shapes]


def constant_output_unet(logit: float) -> UNet:
    model = small_unet()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(logit)
    return model


@pytest.mark.parametrize(("logit", "probability"), [(0.0, 0.5), (math.log(3), 0.75), (-math.log(4), 0.2)])
def test_probabilities_are_the_sigmoid_of_the_logits(logit, probability):
    (result,) = predict_probabilities(constant_output_unet(logit), random_images([(9, 13)]), amp=False)
    assert result.dtype == np.float32
    assert result.shape == (9, 13)
    np.testing.assert_allclose(result, probability, rtol=1e-6)


def test_batched_prediction_equals_one_at_a_time():
    model = small_unet()
    images = random_images([(24, 24)] * 5)
    batched = predict_probabilities(model, images, batch_size=3)
    single = [predict_probabilities(model, [image], batch_size=1)[0] for image in images]
    for got, expected in zip(batched, single, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[1])  # the images really differ


def test_mixed_sizes_keep_order_and_shapes():
    model = small_unet()
    shapes = [(24, 24), (17, 31), (24, 24), (40, 8), (17, 31), (24, 24)]
    images = random_images(shapes, seed=3)
    results = predict_probabilities(model, images, batch_size=2)
    assert [r.shape for r in results] == shapes
    for image, got in zip(images, results, strict=True):
        np.testing.assert_allclose(got, predict_probabilities(model, [image], batch_size=1)[0], rtol=1e-5, atol=1e-6)


def batches_seen(model: UNet) -> list[tuple[int, ...]]:
    """The input shape of every forward pass `model` makes from now on."""
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda _module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_images_of_different_sizes_that_pad_alike_share_a_batch_and_predict_as_alone():
    model = small_unet()  # depth 2: pads to multiples of 4
    shapes = [(21, 22), (24, 24), (22, 21), (17, 31), (23, 24), (10, 10), (9, 10)]
    images = random_images(shapes, seed=5)
    batches = batches_seen(model)
    batched = predict_outputs(model, images, batch_size=4, amp=False)
    # (21, 22), (24, 24), (22, 21), (23, 24) pad to 24x24, the two small ones to 12x12: three
    # passes where one image at a time takes seven ((17, 31), alone, the model pads itself).
    assert sorted(batches) == [(1, 1, 17, 31), (2, 1, 12, 12), (4, 1, 24, 24)]
    assert [output.shape[1:] for output in batched] == shapes
    for image, got in zip(images, batched, strict=True):
        np.testing.assert_allclose(got, predict_outputs(model, [image], amp=False)[0], rtol=1e-5, atol=1e-6)
    tiny = random_images([(3, 4), (4, 4)], seed=6)  # both padded to 8x4 (a 1x1 bottleneck is refused)
    for image, got in zip(tiny, predict_outputs(model, tiny, batch_size=2, amp=False), strict=True):
        np.testing.assert_allclose(got, predict_outputs(model, [image], amp=False)[0], rtol=1e-5, atol=1e-6)


def test_probabilities_lie_in_zero_one():
    images = [image * 50 - 25 for image in random_images([(32, 32)] * 3, seed=5)]  # extreme inputs
    for result in predict_probabilities(small_unet(), images):
        assert result.min() >= 0.0 and result.max() <= 1.0


def test_empty_input_gives_empty_output():
    assert predict_probabilities(small_unet(), []) == []


def test_model_in_train_mode_is_put_in_eval_mode():
    model = small_unet(dropout=0.5).train()
    images = random_images([(32, 32)])
    first = predict_probabilities(model, images)[0]
    assert not model.training
    np.testing.assert_array_equal(first, predict_probabilities(model, images)[0])


def test_threshold_is_strictly_above():
    half = np.float32(0.5)
    probabilities = np.array(
        [[half, np.nextafter(half, np.float32(1)), np.nextafter(half, np.float32(0))], [1.0, 0.0, 0.75]],
        dtype=np.float32,
    )
    assert threshold_probabilities(probabilities).tolist() == [[False, True, False], [True, False, True]]
    assert threshold_probabilities(probabilities, 0.75).tolist() == [[False, False, False], [True, False, False]]
    assert threshold_probabilities(probabilities).dtype == bool


def test_predictor_thresholds_with_its_config():
    torch.manual_seed(0)
    config = ModelConfig(depth=2, base_width=4)
    checkpoint = Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 1)
    predictor = Predictor(checkpoint, PredictConfig(threshold=0.3, device="cpu"), model_version="v7")
    images = [np.random.default_rng(1).integers(0, 255, (20, 28), dtype=np.uint8)]
    assert predictor.model_version == "v7"
    np.testing.assert_array_equal(predictor.masks(images)[0], predictor.probabilities(images)[0] > 0.3)


@pytest.mark.parametrize(("distance_map", "model_splits", "given", "unused"), [
    (False, True, {}, None),
    (False, True, {"split_depth": 1.25}, None),
    (True, True, {"centre_prominence": 0.15}, None),
    (False, True, {"split_touching": False, "split_depth": 1.5, "centre_prominence": 0.25},
     ["split_depth 1.5 is not used: split_touching is off (--no-split)",
      "centre_prominence 0.25 is not used: split_touching is off (--no-split)"]),
    (True, False, {"split_depth": 1.75},
     ["split_depth 1.75 is not used: this model keeps touching cells whole, as decided at its training (--split "
      "splits them)"]),
    (True, False, {"split_touching": True, "split_depth": 2.0},
     ["split_depth 2.0 is not used: this model splits touching cells at the peaks of its distance map, as high as "
      "centre_prominence says (--centre-prominence)"]),
    (False, True, {"centre_prominence": 0.35},
     ["centre_prominence 0.35 is not used: this model has no distance map and splits touching cells where the mask "
      "narrows, as deep as split_depth says (--split-depth)"]),
])
def test_a_splitting_setting_the_model_would_not_use_is_said(distance_map, model_splits, given, unused, caplog):
    """Before, `--no-split --split-depth 3` or `--split-depth` with the shipped nuclei model (which
    splits at its distance map's peaks) changed nothing without a word."""
    config = ModelConfig(depth=2, base_width=4, distance_map=distance_map)
    checkpoint = Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 1)
    checkpoint.split_touching = model_splits
    with caplog.at_level("WARNING", logger="cellseg.infer"):
        Predictor(checkpoint, PredictConfig(device="cpu", **given))
        Predictor(checkpoint, PredictConfig(device="cpu", **given))  # another shard's predictor: said once
    assert [record.getMessage() for record in caplog.records if record.name == "cellseg.infer"] == (unused or [])


def test_the_predictors_threads_hold_for_opencv_too():
    """The split's OpenCV calls run on the threads the run gives the model, not on a pool beside them."""
    import cv2

    config = ModelConfig(depth=2, base_width=4)
    checkpoint = Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 1)
    torch_before, opencv_before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        Predictor(checkpoint, PredictConfig(device="cpu", threads=1))
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
        Predictor(checkpoint, PredictConfig(device="cpu", threads=None))  # None: left as they are
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(torch_before)
        cv2.setNumThreads(opencv_before)


def test_an_image_without_contrast_gets_empty_maps_and_a_warning_without_the_model():
    config = ModelConfig(depth=2, base_width=4, distance_map=True)
    checkpoint = Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 1)
    predictor = Predictor(checkpoint, PredictConfig(device="cpu"))
    with torch.no_grad():  # a model that calls every pixel a cell: any cell below is the model's
        predictor.model.head.weight.zero_()
        predictor.model.head.bias.fill_(5.0)
    sliver = np.zeros((30, 30), np.uint8)
    sliver[0, 0] = 255  # one pixel in 900: below the 99.8th percentile
    textured = np.random.default_rng(2).integers(0, 255, (30, 30), dtype=np.uint8)
    black, white, almost, busy = predictor.cell_maps([np.zeros((30, 30), np.uint8), np.full((30, 30), 255, np.uint16),
                                                      sliver, textured])
    assert black.warnings == ("image is constant (value 0): no cells",)
    assert white.warnings == ("image is constant (value 255): no cells",)
    assert almost.warnings == ("image has no contrast between percentiles 1 and 99.8 (value 0): no cells",)
    for flat in (black, white, almost):
        assert not flat.probability.any() and flat.distance is not None and not flat.distance.any()
    assert busy.warnings == () and (busy.probability > 0.99).all()


@pytest.fixture(scope="module")
def tiny_predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(str(tiny_checkpoint), PredictConfig(device="cpu", batch_size=4))


def test_from_checkpoint_versions_the_model_by_its_file_hash(tiny_checkpoint, tiny_predictor):
    expected = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert tiny_predictor.model_version == expected[:12]
    assert checkpoint_digest(str(tiny_checkpoint)) == expected
    assert tiny_predictor.normalization == load_checkpoint(str(tiny_checkpoint)).model_config.normalization


def test_tiny_model_segments_synthetic_images(synthetic_dataset, tiny_predictor):
    image_urls = list_images(str(synthetic_dataset / "images"))
    images = [read_image(url) for url in image_urls]
    truths = [read_mask(url.replace("/images/", "/masks/")) for url in image_urls]
    masks = tiny_predictor.masks(images)
    dices = []
    for predicted, truth in zip(masks, truths, strict=True):
        assert predicted.shape == truth.shape and predicted.dtype == bool
        overlap = np.logical_and(predicted, truth).sum()
        dices.append(2 * overlap / (predicted.sum() + truth.sum()))
    assert len(dices) == 24
    assert np.mean(dices) > 0.7, dices


def test_predictor_ignores_a_linear_rescale_of_intensities(synthetic_dataset, tiny_predictor):
    # Percentile normalisation makes 8-bit and the same image stretched to 16 bits look alike.
    image = read_image(str(synthetic_dataset / "images" / "synth_0003.png"))
    assert image.dtype == np.uint8
    wide = image.astype(np.uint16) * 257
    narrow_result, wide_result = tiny_predictor.probabilities([image, wide])
    np.testing.assert_allclose(narrow_result, wide_result, atol=1e-5)


_GOOD = np.random.default_rng(0).integers(0, 255, (24, 20), dtype=np.uint8)
_WITH_NAN = _GOOD.astype(np.float32)
_WITH_NAN[3, 4] = np.nan
_WITH_INF = _GOOD.astype(np.float32)
_WITH_INF[0, :2] = np.inf


@pytest.mark.parametrize(("bad", "message"), [
    (np.stack([_GOOD] * 3, axis=-1), r"image 1 has shape \(24, 20, 3\); expected a 2-D \(H, W\) grayscale image: "
                                     r"a colour image \(H, W, C\)\? pass one channel, image\[\.\.\., c\]"),
    (np.stack([_GOOD] * 5), r"image 1 has shape \(5, 24, 20\); expected a 2-D .*a stack of planes\? pass them as "
                            r"separate images, list\(stack\)"),
    (np.zeros((3, 24, 20), np.uint8), r"image 1 has shape \(3, 24, 20\)"),  # constant: was given 3-D empty maps
    (_GOOD.ravel(), r"image 1 has shape \(480,\); expected a 2-D \(H, W\) grayscale image$"),
    (np.zeros((0, 0), np.uint8), r"image 1 is empty \(shape \(0, 0\)\)"),
    (np.zeros((0, 20), np.uint16), r"image 1 is empty \(shape \(0, 20\)\)"),
    (_WITH_NAN, r"image 1: 1 of 480 pixels are NaN or infinite; expected finite intensities"),
    (_WITH_INF, r"image 1: 2 of 480 pixels are NaN or infinite"),
    (np.full((4, 4), 1e300), r"image 1: pixel values reach 1e\+300, beyond the float32 range"),
    (np.array([["a", "b"]]), r"image 1 has dtype <U1; expected integers, floats or booleans"),
])
def test_cell_maps_refuses_an_unusable_image_naming_it_and_what_was_expected(tiny_predictor, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_predictor.cell_maps([_GOOD, bad])


def test_one_bare_image_is_refused_with_the_list_it_should_be(tiny_predictor):
    with pytest.raises(TypeError, match=r"got one 24x20 array: pass one image as \[image\]"):
        tiny_predictor.cell_maps(_GOOD)
    stack = np.stack([_GOOD, _GOOD[::-1]])  # an (N, H, W) array is N images
    np.testing.assert_array_equal(np.stack(tiny_predictor.probabilities(stack)),
                                  np.stack(tiny_predictor.probabilities(list(stack))))


def test_images_given_as_nested_lists_or_booleans_are_read_as_arrays(tiny_predictor):
    from_lists, from_array = tiny_predictor.probabilities([_GOOD.tolist(), _GOOD])
    # Equal to float32's last bits: on an AVX2 CPU the two images of one batch differ by 4e-7.
    np.testing.assert_allclose(from_lists, from_array, rtol=1e-5, atol=1e-6)
    (mask_map,) = tiny_predictor.probabilities([_GOOD > 128])
    assert mask_map.shape == (24, 20) and mask_map.dtype == np.float32


def test_from_checkpoint_takes_a_path_and_settings_as_a_dict(tiny_checkpoint, tiny_predictor):
    from_path = Predictor.from_checkpoint(tiny_checkpoint, {"device": "cpu", "threshold": 0.3, "min_cell_area": 7})
    assert from_path.model_version == tiny_predictor.model_version
    assert (from_path.config.threshold, from_path.config.min_cell_area) == (0.3, 7)
    assert from_path.config == PredictConfig(device="cpu", threshold=0.3, min_cell_area=7,
                                             split_touching=tiny_predictor.config.split_touching,
                                             centre_prominence=tiny_predictor.config.centre_prominence)
    with pytest.raises(ValidationError, match=r"treshold\n  Extra inputs are not permitted"):
        Predictor.from_checkpoint(tiny_checkpoint, {"treshold": 0.3})


def test_a_shipped_models_name_given_as_a_checkpoint_points_to_shipped_predictor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint 'nuclei' does not exist; a model shipped with cellseg is "
                                              r"loaded by name with cellseg.model_source.shipped_predictor\('nuclei'\)"):
        Predictor.from_checkpoint("nuclei")
    with pytest.raises(CheckpointError, match=r"^checkpoint 'missing.pt' does not exist$"):
        Predictor.from_checkpoint("missing.pt")


@pytest.mark.integration
def test_from_checkpoint_on_s3_gives_the_same_version(tiny_checkpoint, tiny_predictor, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options, skip_instance_cache=True).pipe(f"{bucket}/best.pt", tiny_checkpoint.read_bytes())
    remote = Predictor.from_checkpoint(f"{bucket}/best.pt", PredictConfig(device="cpu"), options)
    assert remote.model_version == tiny_predictor.model_version
    image = random_images([(30, 30)])[0]
    np.testing.assert_array_equal(remote.probabilities([image])[0], tiny_predictor.probabilities([image])[0])


def test_fast_path_masks_agree_with_plain_fp32(synthetic_dataset, tiny_checkpoint):
    # The default path (bf16 autocast where the CPU has it, strided max-pool) against amp=False.
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    images = [read_image(url) for url in list_images(str(synthetic_dataset / "images"))]
    fast = Predictor(checkpoint, PredictConfig(device="cpu")).masks(images)
    plain = Predictor(checkpoint, PredictConfig(device="cpu", amp=False)).masks(images)
    agreement = mask_agreement(fast, plain)
    assert agreement["pixel_agreement"] >= 0.999 and agreement["dice"] >= 0.999, agreement


def test_the_cpu_predictor_runs_a_channels_last_network_with_the_channels_first_results(synthetic_dataset,
                                                                                        tiny_checkpoint):
    from cellseg.normalize import normalize_image

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    images = [normalize_image(read_image(url), checkpoint.model_config.normalization)
              for url in list_images(str(synthetic_dataset / "images"))[:6]]
    predictor = Predictor(checkpoint, PredictConfig(device="cpu", amp=False))
    assert predictor.model.channels_last
    expected = predict_probabilities(checkpoint.build_model(), images, amp=False)
    for found, wanted in zip(predictor.normalised_probabilities(images), expected, strict=True):
        np.testing.assert_allclose(found, wanted, rtol=0, atol=1e-5)


def test_mask_agreement_counts_pixels_and_dice():
    a = np.zeros((4, 5), bool)
    b = a.copy()
    a[0, :4] = b[0, 1:] = True  # 3 shared cell pixels, 1 extra on each side
    assert mask_agreement([a], [b]) == {"pixel_agreement": 18 / 20, "dice": 6 / 8}
    assert mask_agreement([], []) == {"pixel_agreement": 1.0, "dice": 1.0}
    with pytest.raises(ValueError):
        mask_agreement([a], [a, b])


def test_tta_keeps_the_shape_and_is_equivariant_to_rotations_and_flips():
    model = small_unet()
    image = random_images([(64, 48)], seed=3)[0]
    (plain,) = predict_probabilities(model, [image], amp=False)
    (averaged,) = predict_probabilities(model, [image], amp=False, tta=True)
    assert averaged.shape == plain.shape == image.shape
    assert not np.allclose(averaged, plain)  # the eight views really differ for this model
    (rotated,) = predict_probabilities(model, [np.rot90(image).copy()], amp=False, tta=True)
    (mirrored,) = predict_probabilities(model, [image[:, ::-1].copy()], amp=False, tta=True)
    np.testing.assert_allclose(rotated, np.rot90(averaged), atol=1e-5)
    np.testing.assert_allclose(mirrored, averaged[:, ::-1], atol=1e-5)


def test_tta_and_tiles_treat_a_distance_map_output_like_the_cell_output():
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=2, base_width=4, dropout=0.0, distance_map=True)).eval()
    image = random_images([(64, 48)], seed=3)[0]
    (outputs,) = predict_outputs(model, [image], amp=False, tta=True)
    assert outputs.shape == (2, 64, 48)
    (rotated,) = predict_outputs(model, [np.rot90(image).copy()], amp=False, tta=True)
    np.testing.assert_allclose(rotated, np.rot90(outputs, axes=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(outputs[0], predict_probabilities(model, [image], amp=False, tta=True)[0])
    large = random_images([(150, 90)], seed=4)[0]
    (tiled,) = predict_outputs(model, [large], amp=False, tile_size=64, tile_overlap=16)
    assert tiled.shape == (2, 150, 90) and tiled.min() >= 0.0 and tiled.max() <= 1.0


def test_tta_output_is_symmetric_for_a_symmetric_input():
    rows, cols = np.ogrid[:64, :64]
    image = (((rows - 31.5) ** 2 + (cols - 31.5) ** 2) < 15**2).astype(np.float32)
    (averaged,) = predict_probabilities(small_unet(), [image], amp=False, tta=True)
    for view in (np.rot90(averaged), averaged[::-1], averaged[:, ::-1], averaged.T):
        np.testing.assert_allclose(view, averaged, atol=1e-5)
