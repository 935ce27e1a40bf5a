"""Inference: a loaded model turned into maps. Normalise, batch images the model pads alike (tile large
ones), forward under inference mode with mixed precision where it helps, sigmoid; test-time
augmentation; a model at a cell size sees each image resampled to it (`cellseg.scale`). What
becomes of the maps (threshold, cells apart) is `cellseg.postprocess`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cellseg.allocator import keep_freed_memory
from cellseg.checkpoint import Checkpoint, CheckpointError, load_checkpoint_with_digest
from cellseg.config import NormalizationConfig, PredictConfig
from cellseg.io import StorageOptions, float_pixel_problem
from cellseg.model import UNet, padded_batches
from cellseg.normalize import flat_level, normalize_image
from cellseg.postprocess import CellMaps, maps_from_output, threshold_probabilities, unused_split_settings
from cellseg.runtime import (
    CompiledByShape,
    autocast_context,
    available_cores,
    model_pass,
    resolve_device,
    set_threads,
)
from cellseg.scale import SizeEstimates, cell_maps_at_cell_size
from cellseg.size_model import SizeModel, batched_network_features, size_estimates
from cellseg.tiling import predict_tiled

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _warn_once(message: str) -> None:
    """Once per process: a run builds a predictor per shard, or per thread count of a large image's blocks."""
    logger.warning(message)


def forward_outputs(
    model: UNet, batch: np.ndarray, device: torch.device, amp: bool = True, tta: bool = False
) -> np.ndarray:
    """Sigmoid of the model's logits for a (B, H, W) float32 batch, as (B, C, H, W) float32: the
    cell probability in channel 0, then the distance map of models that have one.

    With `tta`, the outputs are averaged over the eight flips and 90-degree rotations of the
    input (each mapped back), which makes the result exactly equivariant to them.
    """
    with torch.inference_mode():
        inputs = torch.from_numpy(np.ascontiguousarray(batch))[:, None]
        if device.type == "cuda":  # a page-locked copy goes to the GPU without a staging copy, asynchronously
            inputs = inputs.pin_memory()
        inputs = inputs.to(device, non_blocking=True)

        def outputs(x: torch.Tensor) -> torch.Tensor:
            with model_pass(model, tuple(x.shape)) as forward, autocast_context(device, amp):
                logits = forward(x)
            return torch.sigmoid(logits.float())

        if not tta:
            return outputs(inputs).cpu().numpy()
        total: torch.Tensor | None = None
        for quarter_turns in range(4):
            for mirrored in (False, True):
                x = torch.rot90(inputs, quarter_turns, dims=(2, 3))
                x = x.flip(3) if mirrored else x
                p = outputs(x)
                p = p.flip(3) if mirrored else p
                p = torch.rot90(p, -quarter_turns, dims=(2, 3))
                total = p if total is None else total + p
        assert total is not None
        return (total / 8).cpu().numpy()


def forward_probabilities(
    model: UNet, batch: np.ndarray, device: torch.device, amp: bool = True, tta: bool = False
) -> np.ndarray:
    """The cell probabilities of `forward_outputs`, as (B, H, W) float32."""
    return forward_outputs(model, batch, device, amp, tta)[:, 0]


def predict_outputs(
    model: UNet | Any,
    images: Sequence[np.ndarray],
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = True,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    tta: bool = False,
) -> list[np.ndarray]:
    """Outputs of `forward_outputs` for normalised (H, W) float32 images, as (C, H, W) float32 in [0, 1].

    Images that the model pads to the same shape (`UNet.size_multiple`) are stacked into batches
    of up to `batch_size`, each padded beforehand as the model would pad it alone, so that a
    batch of mixed sizes predicts exactly what each image would; images larger than `tile_size`
    on a side are predicted tile by tile (see `cellseg.tiling`). Order is preserved.
    """
    device = torch.device(device)
    model.eval()
    results: list[np.ndarray | None] = [None] * len(images)
    untiled: list[int] = []
    for index, image in enumerate(images):
        if tile_size is not None and max(image.shape) > tile_size:
            results[index] = predict_tiled(
                lambda tile: forward_outputs(model, tile[None], device, amp, tta)[0], image, tile_size, tile_overlap,
                getattr(model, "size_multiple", 1),
            )
        else:
            untiled.append(index)
    batches = padded_batches([images[i] for i in untiled], getattr(model, "size_multiple", 1), batch_size)
    for positions, batch in batches:
        outputs = forward_outputs(model, batch, device, amp, tta)
        for position, output in zip(positions, outputs, strict=True):
            height, width = images[untiled[position]].shape
            results[untiled[position]] = output[:, :height, :width]
    return results  # type: ignore[return-value]


def predict_probabilities(model: UNet | Any, images: Sequence[np.ndarray], **options: Any) -> list[np.ndarray]:
    """Cell probabilities (channel 0 of `predict_outputs`, which takes the same `options`) as
    (H, W) float32 in [0, 1]."""
    return [output[0] for output in predict_outputs(model, images, **options)]


MAX_POSTPROCESS_WORKERS = 8  # on CUDA: processes labelling and measuring while the GPU runs the next batch
# With batches of several images, a run hands `Predictor.cell_maps` so many batches' worth at once:
# each image is resampled to its own cell size first, so images of one shape seldom come together
# within one batch's worth, and `padded_batches` finds more to stack in a wider call.
BATCHES_PER_CALL = 4
MAX_CALL_PIXELS = 32 * 2**20  # a call takes further batches only while its images hold fewer pixels


def checked_images(images: Sequence[np.ndarray], pixels_checked: bool = False) -> list[np.ndarray]:
    """`images` as (H, W) arrays of integers, floats or booleans; ValueError naming the first
    unusable one by its position and saying what was expected, TypeError for one (H, W) array
    passed where a sequence of images is expected. `pixels_checked`: the images' float pixels
    have been checked for NaN and infinite values already (a pass over every pixel), as
    `cellseg.io` and `cellseg.formats` check what they read, or an earlier `checked_images`."""
    if isinstance(images, np.ndarray) and images.ndim == 2:
        raise TypeError(f"expected a sequence of (H, W) images, got one {images.shape[0]}x{images.shape[1]} array: "
                        "pass one image as [image]")
    return [_checked_image(np.asarray(image), index, pixels_checked) for index, image in enumerate(images)]


def _checked_image(image: np.ndarray, index: int, pixels_checked: bool) -> np.ndarray:
    what = f"image {index}"
    if image.dtype.kind not in "biuf":
        raise ValueError(f"{what} has dtype {image.dtype}; expected integers, floats or booleans")
    if image.ndim != 2:
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            hint = ": a colour image (H, W, C)? pass one channel, image[..., c], or its grayscale"
        elif image.ndim == 3:
            hint = ": a stack of planes? pass them as separate images, list(stack), or choose one"
        else:
            hint = ""
        raise ValueError(f"{what} has shape {image.shape}; expected a 2-D (H, W) grayscale image{hint}")
    if image.size == 0:
        raise ValueError(f"{what} is empty (shape {image.shape}); expected at least one pixel")
    if not pixels_checked and (problem := float_pixel_problem(image)):
        raise ValueError(f"{what}: {problem}")
    return image


class Predictor:
    """A loaded model ready to turn raw images into `CellMaps`; load once, call many times.

    `config` is a `PredictConfig` or a dict of its fields (validated: an unknown key is refused
    by name). Building one sets the process's torch and OpenCV threads when `config.threads` is
    given, and on CPU glibc's malloc to keep freed memory (`PredictConfig.keep_freed_memory`).
    """

    def __init__(self, checkpoint: Checkpoint, config: PredictConfig | Mapping[str, Any] = PredictConfig(),
                 model_version: str = ""):
        self.checkpoint = checkpoint
        if not isinstance(config, PredictConfig):
            config = PredictConfig.model_validate(config)
        for unused in unused_split_settings(config, checkpoint.split_touching, checkpoint.model_config.distance_map):
            _warn_once(unused)
        # Settings left to the model take what training decided for it.
        if config.split_touching is None:
            config = config.model_copy(update={"split_touching": checkpoint.split_touching})
        if config.threshold is None:
            config = config.model_copy(update={"threshold": checkpoint.threshold})
        if config.centre_prominence is None:
            config = config.model_copy(update={"centre_prominence": checkpoint.centre_prominence})
        self.config = config
        self.model_version = model_version
        self.device = resolve_device(config.device)
        set_threads(config.threads)
        if self.device.type == "cpu" and config.keep_freed_memory:
            keep_freed_memory()
        self.batch_size = config.batch_size or (8 if self.device.type == "cuda" else 1)
        self.postprocess_workers = config.postprocess_workers if config.postprocess_workers is not None else (
            max(1, min(MAX_POSTPROCESS_WORKERS, available_cores() - 2)) if self.device.type == "cuda" else 0)
        self.model = checkpoint.inference_model(self.device)
        self.forward_model: Any = self.model
        if config.compile:
            self.forward_model = CompiledByShape(self.model, to_compile=lambda: checkpoint.build_model().to(self.device))
        self.size_estimate: SizeEstimates | None = None
        model_diameter = checkpoint.model_config.cell_diameter
        if checkpoint.size_model is not None and isinstance(model_diameter, float | int):
            size_model = SizeModel.from_dict(checkpoint.size_model)
            features = batched_network_features(self.model, self.device, config.amp, self.batch_size)
            self.size_estimate = size_estimates(size_model, features, float(model_diameter))

    @classmethod
    def from_checkpoint(
        cls, url: str | os.PathLike[str], config: PredictConfig | Mapping[str, Any] = PredictConfig(),
        storage_options: StorageOptions = None,
    ) -> Predictor:
        """Load the checkpoint file at `url` (a path or fsspec URL; weights_only); the model version
        is the file's content hash. A model shipped in the package is loaded by name with
        `cellseg.model_source.shipped_predictor`."""
        url = os.fspath(url)
        try:
            checkpoint, digest = load_checkpoint_with_digest(url, storage_options)
        except CheckpointError as error:
            if "/" in url or "." in url or os.path.exists(url):
                raise
            raise CheckpointError(f"{error}; a model shipped with cellseg is loaded by name with "
                                  f"cellseg.model_source.shipped_predictor({url!r})") from error
        return cls(checkpoint, config, digest[:12])

    @property
    def images_per_call(self) -> int:
        """How many images a run hands `cell_maps` at once (at most; see MAX_CALL_PIXELS): one
        batch at batch size 1 (CPU), else BATCHES_PER_CALL batches, so that images resampled to
        one shape share passes."""
        return self.batch_size if self.batch_size == 1 else self.batch_size * BATCHES_PER_CALL

    @property
    def normalization(self) -> NormalizationConfig:
        return self.checkpoint.model_config.normalization

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) float32 cell probabilities in [0, 1] for raw (H, W) images of any dtype and size."""
        return [maps.probability for maps in self.cell_maps(images)]

    def normalised_probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) float32 cell probabilities for images already normalised as the model expects."""
        return [maps.probability for maps in self.normalised_cell_maps(images)]

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) boolean cell masks (probability above the threshold) for raw images."""
        return [threshold_probabilities(p, self.threshold) for p in self.probabilities(images)]

    @property
    def threshold(self) -> float:
        """The probability threshold in use: the settings', else the one decided for the model."""
        return self.checkpoint.threshold if self.config.threshold is None else self.config.threshold

    def cell_maps(self, images: Sequence[np.ndarray], cell_diameters: Sequence[float | None] | None = None) -> list[CellMaps]:
        """One `CellMaps` per raw (H, W) image (integers, floats or booleans, any size), in order;
        `cellseg.postprocess.cell_labels(maps, predictor.config)` turns each into cell labels.
        `cell_diameters` (pixels, one per image, None: the config's) for a model at a cell size,
        such as a diameter given in µm converted with each image's pixel size.

        An image without contrast (`flat_level`: a constant image, say) holds nothing to segment:
        it gets empty maps, without a pass of the model, with a warning that says so. An image that
        is not 2-D, is empty or holds NaN or infinite pixels is refused (`checked_images`).
        """
        return self.checked_cell_maps(checked_images(images), cell_diameters)

    def checked_cell_maps(
        self, images: Sequence[np.ndarray], cell_diameters: Sequence[float | None] | None = None,
    ) -> list[CellMaps]:
        """`cell_maps` of images whose pixels were checked for NaN and infinite values on their way
        in (`checked_images`, or a reader of `cellseg.io` or `cellseg.formats`): their shapes and
        dtypes are checked again, their pixels are not scanned a second time."""
        images = checked_images(images, pixels_checked=True)
        levels = [flat_level(image, self.normalization) for image in images]
        diameters = list(cell_diameters) if cell_diameters is not None else [None] * len(images)
        predicted = iter(self.normalised_cell_maps(
            [normalize_image(image, self.normalization) for image, level in zip(images, levels, strict=True)
             if level is None],
            [diameter for diameter, level in zip(diameters, levels, strict=True) if level is None],
        ))
        return [next(predicted) if level is None else self._flat_maps(image, level)
                for image, level in zip(images, levels, strict=True)]

    def _flat_maps(self, image: np.ndarray, level: float) -> CellMaps:
        """Empty maps for an image without contrast, and the warning that says why."""
        if image.min() == image.max():
            what = f"image is constant (value {level:g})"
        else:
            low, high = self.normalization.low_percentile, self.normalization.high_percentile
            what = f"image has no contrast between percentiles {low:g} and {high:g} (value {level:g})"
        empty = np.zeros(image.shape, dtype=np.float32)
        distance = empty if self.checkpoint.model_config.distance_map else None
        return CellMaps(empty, distance, warnings=(f"{what}: no cells",))

    def normalised_cell_maps(
        self, images: Sequence[np.ndarray], cell_diameters: Sequence[float | None] | None = None,
        tile_size: int | None = None,
    ) -> list[CellMaps]:
        """`CellMaps` for images already normalised as the model expects; `tile_size`, when given,
        replaces the config's (a block's window predicted as one tile, `cellseg.blocks`).

        A model trained at a cell size (`ModelConfig.cell_diameter`) sees each image resampled
        to that size (`cellseg.scale.cell_maps_at_cell_size`: the size is
        `PredictConfig.cell_diameter` when given, else measured), the resampled images batched
        as any others, and the maps come back on the image's own grid.
        """
        model_config = self.checkpoint.model_config
        forward = self._forward if tile_size is None else functools.partial(self._forward, tile_size=tile_size)
        if model_config.cell_diameter is None:
            return [maps_from_output(output, model_config.distance_map) for output in forward(images)]
        diameters = list(cell_diameters) if cell_diameters is not None else [None] * len(images)
        configs = [self.config if diameter is None else self.config.model_copy(update={"cell_diameter": diameter})
                   for diameter in diameters]
        return cell_maps_at_cell_size(
            images, forward, model_config, configs, self.size_estimate)

    def forward_one(self, image: np.ndarray) -> np.ndarray:
        """The (C, H, W) output for one normalised (H, W) image on its own grid."""
        return self._forward([image])[0]

    def _forward(self, images: Sequence[np.ndarray], tile_size: int | None = None) -> list[np.ndarray]:
        return predict_outputs(
            self.forward_model, images, self.batch_size, self.device, self.config.amp,
            tile_size or self.config.tile_size, self.config.tile_overlap, self.config.tta,
        )
