"""Prediction: normalise, batch same-sized images (tile large ones), forward under inference mode
with mixed precision where it helps, sigmoid, threshold."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellseg.checkpoint import Checkpoint, load_checkpoint
from cellseg.config import NormalizationConfig, PredictConfig
from cellseg.data import normalize_image
from cellseg.instances import split_at_distance_peaks, split_touching_cells
from cellseg.io import StorageOptions, filesystem
from cellseg.model import UNet
from cellseg.registry import Registry
from cellseg.scale import (
    SAME_SIZE,
    distinct_sizes,
    measurement_scales,
    median_cell_diameter,
    resize,
    scale_factor,
    scaled_shape,
)
from cellseg.tiling import predict_tiled
from cellseg.train import autocast_context, resolve_device


def forward_outputs(
    model: UNet, batch: np.ndarray, device: torch.device, amp: bool = True, tta: bool = False
) -> np.ndarray:
    """Sigmoid of the model's logits for a (B, H, W) float32 batch, as (B, C, H, W) float32: the
    cell probability in channel 0, then the distance map of models that have one.

    With `tta`, the outputs are averaged over the eight flips and 90-degree rotations of the
    input (each mapped back), which makes the result exactly equivariant to them.
    """
    with torch.inference_mode():
        inputs = torch.from_numpy(np.ascontiguousarray(batch))[:, None].to(device)

        def outputs(x: torch.Tensor) -> torch.Tensor:
            with autocast_context(device, amp):
                logits = model(x)
            return torch.sigmoid(logits.float())

        if not tta:
            return outputs(inputs).cpu().numpy()
        total = None
        for quarter_turns in range(4):
            for mirrored in (False, True):
                x = torch.rot90(inputs, quarter_turns, dims=(2, 3))
                x = x.flip(3) if mirrored else x
                p = outputs(x)
                p = p.flip(3) if mirrored else p
                p = torch.rot90(p, -quarter_turns, dims=(2, 3))
                total = p if total is None else total + p
        return (total / 8).cpu().numpy()


def forward_probabilities(
    model: UNet, batch: np.ndarray, device: torch.device, amp: bool = True, tta: bool = False
) -> np.ndarray:
    """The cell probabilities of `forward_outputs`, as (B, H, W) float32."""
    return forward_outputs(model, batch, device, amp, tta)[:, 0]


def predict_outputs(
    model: UNet,
    images: Sequence[np.ndarray],
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = True,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    tta: bool = False,
) -> list[np.ndarray]:
    """Outputs of `forward_outputs` for normalised (H, W) float32 images, as (C, H, W) float32 in [0, 1].

    Images of equal shape are stacked into batches of up to `batch_size`; images larger than
    `tile_size` on a side are predicted tile by tile (see `cellseg.tiling`). Order is preserved.
    """
    device = torch.device(device)
    model.eval()
    results: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        if tile_size is not None and max(image.shape) > tile_size:
            results[index] = predict_tiled(
                lambda tile: forward_outputs(model, tile[None], device, amp, tta)[0], image, tile_size, tile_overlap
            )
        else:
            by_shape[image.shape].append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            outputs = forward_outputs(model, np.stack([images[i] for i in chunk]), device, amp, tta)
            for i, output in zip(chunk, outputs):
                results[i] = output
    return results  # type: ignore[return-value]


def predict_probabilities(
    model: UNet,
    images: Sequence[np.ndarray],
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    amp: bool = True,
    tile_size: int | None = None,
    tile_overlap: int = 128,
    tta: bool = False,
) -> list[np.ndarray]:
    """Cell probabilities (channel 0 of `predict_outputs`) as (H, W) float32 in [0, 1]."""
    outputs = predict_outputs(model, images, batch_size, device, amp, tile_size, tile_overlap, tta)
    return [output[0] for output in outputs]


@dataclass(frozen=True)
class CellMaps:
    """What a model says about one image, on the image's own grid: the cell probability (H, W)
    and, from a model with a distance-map output, each cell's normalised distance (H, W). From a
    model at a cell size, `scale` says how the image was seen: its cells' median diameter in
    pixels (`cell_diameter`, None when none were found), whether that was `measured` by a first
    pass or stated, and the `factor` the image was resampled by."""

    probability: np.ndarray
    distance: np.ndarray | None = None
    scale: dict[str, Any] | None = None


SCALE_TOLERANCE = 0.05  # cells within 5% of the model's size are predicted at the image's own scale
# A measured cell size is trusted when predicting at the scale it asks for finds cells within 25%
# of the size expected there (log ratio). On dsb2018, first passes that saw nuclei of 33-39 px as
# 10-31 px were off by 1.3-1.9 times there; right ones by at most 1.2.
MEASURE_MISFIT = float(np.log(1.25))


def threshold_probabilities(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean cell mask: probability strictly above `threshold`."""
    return probabilities > threshold


class Predictor:
    """A loaded model ready to segment raw images; load once, call many times."""

    def __init__(self, checkpoint: Checkpoint, config: PredictConfig = PredictConfig(), model_version: str = ""):
        self.checkpoint = checkpoint
        self.config = config
        self.model_version = model_version
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)  # process-wide: one predictor per worker process
        self.batch_size = config.batch_size or (8 if self.device.type == "cuda" else 1)
        self.model = checkpoint.build_model().to(self.device)
        self.forward_model = torch.compile(self.model) if config.compile else self.model

    @classmethod
    def from_checkpoint(
        cls, url: str, config: PredictConfig = PredictConfig(), storage_options: StorageOptions = None
    ) -> Predictor:
        """Load `url` (weights_only); the model version defaults to the file's content hash."""
        return cls(load_checkpoint(url, storage_options), config, checkpoint_digest(url, storage_options)[:12])

    @classmethod
    def from_registry(
        cls, registry_url: str, version: str = "current", config: PredictConfig = PredictConfig(),
        storage_options: StorageOptions = None,
    ) -> Predictor:
        """Load a registered version (checksum verified); the model version is its registry name."""
        checkpoint, meta = Registry(registry_url, storage_options).load(version)
        return cls(checkpoint, config, meta.version)

    @property
    def normalization(self) -> NormalizationConfig:
        return self.checkpoint.model_config.normalization

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) float32 cell probabilities for raw (H, W) images of any dtype and size."""
        return [maps.probability for maps in self.cell_maps(images)]

    def normalised_probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) float32 cell probabilities for images already normalised as the model expects."""
        return [maps.probability for maps in self.normalised_cell_maps(images)]

    def cell_maps(self, images: Sequence[np.ndarray]) -> list[CellMaps]:
        """`CellMaps` for raw (H, W) images of any dtype and size."""
        return self.normalised_cell_maps([normalize_image(image, self.normalization) for image in images])

    def normalised_cell_maps(self, images: Sequence[np.ndarray]) -> list[CellMaps]:
        """`CellMaps` for images already normalised as the model expects.

        A model trained at a cell size (`ModelConfig.cell_diameter`) sees each image resampled
        to that size (`cellseg.scale`), one image at a time, and the maps come back on the
        image's own grid. The size of the image's cells is `PredictConfig.cell_diameter` when
        given, else measured (`_measured_cell_maps`).
        """
        model_diameter = self.checkpoint.model_config.cell_diameter
        if model_diameter is None:
            return [self._cell_maps(output) for output in self._forward(images)]
        results = []
        for image in images:
            if self.config.cell_diameter is None:
                maps, cell_diameter, factor = self._measured_cell_maps(image, model_diameter)
            else:
                cell_diameter = self.config.cell_diameter
                factor = self._factor(cell_diameter, model_diameter, image.shape)
                maps = self._cell_maps_at(image, factor)[0]
            scale = {"cell_diameter": cell_diameter, "measured": self.config.cell_diameter is None, "factor": factor}
            results.append(dataclasses.replace(maps, scale=scale))
        return results

    def _measured_cell_maps(self, image: np.ndarray, model_diameter: float) -> tuple[CellMaps, float | None, float]:
        """(maps, the median cell diameter they were predicted for, resampling factor) of an image
        whose cell size is unknown.

        A first pass at the image's own scale measures its cells, and the image is predicted at
        the scale that measurement asks for. That is the answer when the cells found there have
        the size they should (the model's, unless the scale hit its bounds) within
        MEASURE_MISFIT. Otherwise the first pass was fooled, typically by cells several times the
        model's size seen as pieces of its size: the image is measured again shrunk
        (`measurement_scales`), each distinct size is tried the same way, and the one whose cells
        come out closest to their expected size wins. No cells anywhere: the maps of the image's
        own scale, size None.
        """
        native = self._cell_maps_at(image, 1.0)
        tried: list[tuple[float, CellMaps, float, float]] = []  # (misfit, maps, diameter, factor)

        def attempt(diameter: float) -> float:
            factor = self._factor(diameter, model_diameter, image.shape)
            maps, scaled = native if factor == 1.0 else self._cell_maps_at(image, factor)
            found = self._median_diameter(scaled)
            misfit = float(abs(np.log(found / (diameter * factor)))) if found else np.inf
            tried.append((misfit, maps, diameter, factor))
            return misfit

        first = self._median_diameter(native[1])
        if first is not None and attempt(first) <= MEASURE_MISFIT:
            return tried[0][1], first, tried[0][3]
        candidates = []
        for factor in measurement_scales(image.shape)[1:]:
            diameter = self._median_diameter(self._forward_at(image, factor))
            if diameter is not None:
                candidates.append(diameter / factor)
        for diameter in distinct_sizes(candidates):
            if first is None or abs(np.log(diameter / first)) > np.log1p(SAME_SIZE):
                attempt(diameter)
        if not tried:
            return native[0], None, 1.0
        _, maps, diameter, factor = min(tried, key=lambda entry: entry[0])
        return maps, diameter, factor

    def _median_diameter(self, scaled: np.ndarray) -> float | None:
        # Measured on the mask alone: a distance map is only right at the model's cell size and
        # splits larger cells into pieces (dsb2018 F1 0.815 measured so, 0.792 from its own split).
        return median_cell_diameter(self.cell_labels(CellMaps(scaled[0])))

    @staticmethod
    def _factor(cell_diameter: float | None, model_diameter: float, shape: tuple[int, ...]) -> float:
        """`scale_factor`, with factors within SCALE_TOLERANCE of 1 taken as 1."""
        factor = scale_factor(cell_diameter, model_diameter, shape)
        return 1.0 if abs(factor - 1.0) < SCALE_TOLERANCE else factor

    def _forward_at(self, image: np.ndarray, factor: float) -> np.ndarray:
        """The raw (C, h, w) output for the image resampled by `factor`, on the resampled grid."""
        resampled = image if factor == 1.0 else resize(image, scaled_shape(image.shape, factor), order=1)
        return self._forward([resampled])[0]

    def _cell_maps_at(self, image: np.ndarray, factor: float) -> tuple[CellMaps, np.ndarray]:
        """The image predicted resampled by `factor`: its `CellMaps` back on the image's grid, and
        the raw (C, h, w) output on the resampled grid."""
        output = self._forward_at(image, factor)
        if factor == 1.0:
            return self._cell_maps(output), output
        return self._cell_maps(np.stack([np.clip(resize(channel, image.shape, order=1), 0.0, 1.0) for channel in output])), output

    def _forward(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return predict_outputs(
            self.forward_model, images, self.batch_size, self.device, self.config.amp,
            self.config.tile_size, self.config.tile_overlap, self.config.tta,
        )

    def cell_labels(self, maps: CellMaps) -> np.ndarray:
        """One label per cell, as `cellseg predict` stores them: the probability thresholded,
        touching cells split apart unless `split_touching` is off (at the peaks of the distance
        map when there is one, else at necks of the mask), cells below `min_cell_area` dropped."""
        mask = threshold_probabilities(maps.probability, self.config.threshold)
        if maps.distance is not None and self.config.split_touching:
            return split_at_distance_peaks(mask, maps.distance, self.config.min_cell_area, self.config.centre_prominence)
        split_depth = self.config.split_depth if self.config.split_touching else 0.0
        return split_touching_cells(mask, self.config.min_cell_area, split_depth)

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """(H, W) boolean cell masks for raw images."""
        return [threshold_probabilities(p, self.config.threshold) for p in self.probabilities(images)]

    def _cell_maps(self, output: np.ndarray) -> CellMaps:
        """`CellMaps` of one (C, H, W) model output: channel 0, and the last for a distance-map model."""
        return CellMaps(output[0], output[-1] if self.checkpoint.model_config.distance_map else None)


_predictor_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _cached_registry_predictor(registry_url: str, version: str, config_json: str) -> Predictor:
    config = PredictConfig.model_validate_json(config_json)
    from cellseg.bundled import BUNDLED_VERSION, bundled_checkpoint

    if version == BUNDLED_VERSION:
        predictor = Predictor.from_checkpoint(bundled_checkpoint(), config)
        predictor.model_version = f"{BUNDLED_VERSION}-{predictor.model_version}"
        return predictor
    return Predictor.from_registry(registry_url, version, config)


def shared_predictor(registry_url: str, version: str, config: PredictConfig) -> Predictor:
    """One Predictor per (registry, version, settings) per process, so each worker loads a model once.
    The version 'bundled' is the model shipped in the package, whatever the registry holds."""
    with _predictor_lock:
        return _cached_registry_predictor(registry_url, version, config.model_dump_json())


def checkpoint_digest(url: str, storage_options: StorageOptions = None) -> str:
    """SHA-256 of a checkpoint file's bytes."""
    fs, path = filesystem(url, storage_options)
    return hashlib.sha256(fs.cat_file(path)).hexdigest()
