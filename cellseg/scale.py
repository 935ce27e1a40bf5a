"""Cell size: rescale images so that their cells have the diameter a model was trained at.

Nuclei in one collection can differ tenfold in size from one microscope to the next. A U-Net sees a fixed window, so a model trained on
such a mix must both resolve the one-pixel gaps between small touching nuclei and cover big
nuclei that fill its view. Training and predicting at one cell size, as Cellpose does, takes
that burden off the network: every training image is resampled so that its median cell has the
model's `cell_diameter`, and every image to segment is resampled likewise (after a first pass
that measures its cells, unless the user states their size), predicted, and the probabilities
resampled back to the image's own grid. Masks, cells and statistics stay in image pixels.

Measuring a size the model was not trained at is the delicate part. At the image's own scale a
model sees cells several times its size as pieces of about its own size, and would enlarge
them instead of shrinking them. So a measurement
is checked: predicted at the scale it asks for, the image must show cells of the model's size.
When it does not, the image is measured again shrunk by 2 and 4, and of all the sizes tried the
one whose check comes out closest wins (`measured_cell_maps`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

import cv2
import numpy as np
from scipy import ndimage

from cellseg.config import ModelConfig, PredictConfig
from cellseg.loaded_pairs import LoadedPair
from cellseg.postprocess import CellMaps, cell_labels, maps_from_output, split_touching_cells
from cellseg.runtime import available_cores
from cellseg.stats import cell_areas

Forward = Callable[[np.ndarray], np.ndarray]
"""A model's forward pass for one normalised (H, W) image: its (C, H, W) output on the same grid."""
Forwards = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
"""`Forward` of several images at once (batched as the predictor batches)."""
SizeEstimates = Callable[[Sequence[np.ndarray]], list[float]]
"""A model's estimate of the median cell diameter (pixels) of each normalised (H, W) image."""

MAX_SCALE = 4.0  # cells are never enlarged or shrunk more than this
# Threads that resample and measure the images of one batch side by side (OpenCV and the
# numba-compiled split release the GIL): on a GPU the host does this while the device waits.
MAX_IMAGE_THREADS = 8
MAX_UPSCALED_PIXELS = 2**26  # an enlarged image stays below this many pixels (64 M, 256 MB as float32)


def median_cell_diameter(labels: np.ndarray) -> float | None:
    """Diameter (pixels) of the disc whose area is the median cell area of `labels`; None
    without cells."""
    areas = cell_areas(labels)
    return _disc_diameter(float(np.median(areas))) if areas.size else None


def _disc_diameter(area: float) -> float:
    return float(np.sqrt(4.0 * area / np.pi))


def scale_factor(cell_diameter: float | None, model_cell_diameter: float, shape: tuple[int, ...]) -> float:
    """Factor that brings cells `cell_diameter` pixels across to `model_cell_diameter`, within
    [1/MAX_SCALE, MAX_SCALE] and without enlarging the image past MAX_UPSCALED_PIXELS;
    1.0 when the cell size is unknown."""
    if not cell_diameter:
        return 1.0
    return float(np.clip(model_cell_diameter / cell_diameter, 1.0 / MAX_SCALE, largest_factor(shape)))


def largest_factor(shape: tuple[int, ...]) -> float:
    """The most an image of `shape` is enlarged: MAX_SCALE, less where that would take it past
    MAX_UPSCALED_PIXELS, and never below 1."""
    return max(1.0, min(MAX_SCALE, float(np.sqrt(MAX_UPSCALED_PIXELS / np.prod(shape)))))


MEASURE_SCALES = (1.0, 0.5, 0.25)  # where a first pass looks for cells of unknown size
MIN_MEASURE_SIDE = 64  # a shrunk first pass keeps at least this many pixels a side
SAME_SIZE = 0.1  # sizes within 10% of each other are one candidate


def measurement_scales(shape: tuple[int, ...]) -> list[float]:
    """The scales of the first passes that measure an image's cells: its own, then shrunk by 2 and
    4 while it keeps MIN_MEASURE_SIDE pixels a side. Cells much larger than a model's size come
    apart in pieces of about its size at the image's own scale; shrunk, they are seen whole."""
    return [factor for factor in MEASURE_SCALES if factor == 1.0 or min(scaled_shape(shape, factor)) >= MIN_MEASURE_SIDE]


def distinct_sizes(sizes: Sequence[float], tolerance: float = SAME_SIZE) -> list[float]:
    """The sizes in increasing order, each within `tolerance` (relative) of a kept one dropped."""
    kept: list[float] = []
    for size in sorted(sizes):
        if not kept or size > kept[-1] * (1.0 + tolerance):
            kept.append(size)
    return kept


def scaled_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    """(H, W) of an image of `shape` resampled by `factor`, at least one pixel a side."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def resize(array: np.ndarray, shape: tuple[int, int], order: int) -> np.ndarray:
    """Resample an (H, W) array to `shape`: order 1 (bilinear, smoothed first when shrinking, so
    that fine texture does not alias) for images and probabilities, order 0 (nearest) for masks
    and labels, whose values must not mix. The dtype is kept.

    Both follow `scipy.ndimage.zoom(..., mode="nearest", grid_mode=True)` (pixel areas aligned,
    edges repeated), after `scipy.ndimage.gaussian_filter` of sigma (1 / factor - 1) / 2 on each
    shrunk axis; order 1 is computed by OpenCV, which agrees with SciPy to float32 rounding and
    is many times faster (`benchmarks.resampling`).
    """
    if array.shape == tuple(shape):
        return array
    factors = (shape[0] / array.shape[0], shape[1] / array.shape[1])
    if order > 0:
        return _bilinear(array, shape, factors)
    source = array.view(np.uint8) if array.dtype == bool else array
    resized = ndimage.zoom(source, factors, order=order, mode="nearest", grid_mode=True).astype(array.dtype, copy=False)
    if resized.shape != tuple(shape):  # zoom rounds the output shape; never off by more than a pixel
        resized = np.pad(resized, [(0, max(0, n - m)) for n, m in zip(shape, resized.shape, strict=True)], mode="edge")
        resized = resized[: shape[0], : shape[1]]
    return resized


def _bilinear(array: np.ndarray, shape: tuple[int, int], factors: tuple[float, float]) -> np.ndarray:
    """`resize` at order 1, computed in float32."""
    source: np.ndarray = np.ascontiguousarray(array, dtype=np.float32)
    if min(factors) < 1.0:
        rows, columns = (_gaussian_taps((1.0 / factor - 1.0) / 2.0) for factor in factors)
        source = cv2.sepFilter2D(source, -1, columns, rows, borderType=cv2.BORDER_REPLICATE)
    # OpenCV's bilinear resampling aligns pixel areas and repeats the edge, as zoom's grid mode does.
    resized = cv2.resize(source, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return resized.astype(array.dtype, copy=False)


def _gaussian_taps(sigma: float) -> np.ndarray:
    """The weights of `scipy.ndimage.gaussian_filter`'s kernel along one axis (radius 4 sigma,
    rounded); a single tap of 1 where sigma is 0 (the axis is not smoothed)."""
    if sigma <= 1e-15:
        return np.ones(1, dtype=np.float32)
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def cells_of(pair: LoadedPair) -> np.ndarray:
    """The pair's cell labels: its instance labels, else its mask split as `cellseg predict` splits."""
    return pair.instances if pair.instances is not None else split_touching_cells(pair.mask)


SIZE_SPREAD = 1.5  # collections whose images' cell sizes differ more than this work at one size


def collection_cell_diameter(pairs: Sequence[LoadedPair]) -> float | None:
    """The cell size a model of these training pairs should work at, or None for their own scale.

    When the images' median cell diameters differ by more than SIZE_SPREAD times (10th to 90th
    percentile over the images), the result is the diameter of the median cell of the whole
    collection, pooled over its images, rounded to half a pixel; otherwise None (the figures
    behind SIZE_SPREAD are in docs/quality.md).
    """
    per_image = [areas for areas in (cell_areas(cells_of(pair)) for pair in pairs) if areas.size]
    if len(per_image) < 2:
        return None
    low, high = np.percentile([_disc_diameter(float(np.median(areas))) for areas in per_image], [10, 90])
    if high <= SIZE_SPREAD * low:
        return None
    return round(_disc_diameter(float(np.median(np.concatenate(per_image)))) * 2) / 2


def rescale_pair(pair: LoadedPair, model_cell_diameter: float) -> LoadedPair:
    """The pair resampled so that its median cell is `model_cell_diameter` pixels across.

    Cells are the instance labels where the pair has them, else the mask's touching cells split
    apart as `cellseg predict` splits them. A pair without cells is returned unchanged.
    """
    factor = scale_factor(median_cell_diameter(cells_of(pair)), model_cell_diameter, pair.image.shape)
    if factor == 1.0:
        return pair
    shape = scaled_shape(pair.image.shape, factor)
    return dataclasses.replace(
        pair,
        image=resize(pair.image, shape, order=1),
        mask=resize(pair.mask, shape, order=0),
        instances=None if pair.instances is None else resize(pair.instances, shape, order=0),
    )


def rescale_pairs(pairs: Sequence[LoadedPair], model_config: ModelConfig) -> list[LoadedPair]:
    """The pairs as a model of `model_config` trains and validates on: each resampled to the
    model's cell size, or unchanged when the model has none (an undecided 'auto' counts as none)."""
    diameter = model_config.without_auto().cell_diameter
    if not isinstance(diameter, float | int):
        return list(pairs)
    return [rescale_pair(pair, diameter) for pair in pairs]


SCALE_TOLERANCE = 0.05  # cells within 5% of the model's size are predicted at the image's own scale
# Other factors are taken to the nearest of 2**(k / SCALE_STEPS): at most 4.4% off the size asked
# for, less than the tolerance above. Images of one shape whose cell sizes are near each other are
# then resampled to one shape, and share a batched pass (a GPU's batches of 8 held 1.43 synthetic
# 512x512 images a pass when each image had a factor of its own: docs/performance.md "GPU").
SCALE_STEPS = 8
# A measured cell size is trusted when predicting at the scale it asks for finds cells within 25%
# of the size expected there (log ratio). On dsb2018, first passes that saw nuclei of 33-39 px as
# 10-31 px were off by 1.3-1.9 times there; right ones by at most 1.2.
MEASURE_MISFIT = float(np.log(1.25))


def cell_maps_at_cell_size(
    images: Sequence[np.ndarray], forward: Forwards, model_config: ModelConfig, configs: Sequence[PredictConfig],
    estimate: SizeEstimates | None = None,
) -> list[CellMaps]:
    """`CellMaps` of normalised (H, W) images for a model at a cell size (`model_config.cell_diameter`):
    each image is resampled so that its cells have the model's size, predicted, and its maps come
    back on the image's own grid. The size of an image's cells is its config's `cell_diameter`
    when given, else estimated by the model's size model (`estimate`, see `estimated_cell_maps`),
    else measured by first passes (`measured_cell_maps`, for models without one, one image at a
    time). The images of each pass go to `forward` together, so that it can batch them.
    `CellMaps.scale` records the size and the factor used."""
    model_diameter = model_config.cell_diameter
    if not isinstance(model_diameter, float | int):
        raise ValueError(f"the model has no cell size ({model_diameter!r}): predict it at the image's own scale")
    results: list[CellMaps | None] = [None] * len(images)
    stated = [i for i, config in enumerate(configs) if config.cell_diameter is not None]
    estimated = [i for i, config in enumerate(configs) if config.cell_diameter is None and estimate is not None]
    factors = [prediction_factor(configs[i].cell_diameter, model_diameter, images[i].shape) for i in stated]
    for i, factor, (maps, _) in zip(stated, factors, _cell_maps_at([images[i] for i in stated], forward, factors,
                                                                    model_config.distance_map), strict=True):
        results[i] = dataclasses.replace(
            maps, scale={"cell_diameter": configs[i].cell_diameter, "measured": False, "factor": factor})
    if estimated:
        assert estimate is not None
        for i, (maps, diameter, factor, measured) in zip(estimated, estimated_cell_maps(
                [images[i] for i in estimated], forward, model_config, [configs[i] for i in estimated], estimate), strict=True):
            results[i] = dataclasses.replace(
                maps, scale={"cell_diameter": diameter, "measured": True, "factor": factor, "measured_diameter": measured})
    for i, result in enumerate(results):
        if result is None:
            found_maps, found_diameter, found_factor = measured_cell_maps(
                images[i], lambda image: forward([image])[0], model_config, configs[i])
            results[i] = dataclasses.replace(
                found_maps, scale={"cell_diameter": found_diameter, "measured": True, "factor": found_factor})
    return results  # type: ignore[return-value]


def estimated_cell_maps(
    images: Sequence[np.ndarray], forward: Forwards, model_config: ModelConfig, configs: Sequence[PredictConfig],
    estimate: SizeEstimates,
) -> list[tuple[CellMaps, float, float, float | None]]:
    """(maps, the cell diameter they were predicted for, resampling factor, median diameter of
    the cells found) of each image whose cell size the model's size model estimates.

    Each image is predicted at its estimated size and its cells measured there (in image
    pixels), as Cellpose refines its size model's estimate. When they are more than
    MEASURE_MISFIT off the estimate, the estimate was poor and the image is predicted once more
    at the measured size, which the model's scale augmentation makes reliable.
    """
    model_diameter = float(model_config.cell_diameter)  # type: ignore[arg-type]
    distance_map = model_config.distance_map
    diameters = list(estimate(images))
    factors = [prediction_factor(diameter, model_diameter, image.shape) for diameter, image in zip(diameters, images, strict=True)]
    passes = _cell_maps_at(images, forward, factors, distance_map)
    measured = _each_image(lambda i: _found_diameter(passes[i][1], factors[i], distance_map, configs[i]), len(passes))
    again = [i for i, found in enumerate(measured)
             if found is not None and abs(np.log(found / diameters[i])) > MEASURE_MISFIT]
    remeasured = [float(measured[i]) for i in again]  # type: ignore[arg-type]
    second_factors = [prediction_factor(diameter, model_diameter, images[i].shape) for i, diameter in zip(again, remeasured, strict=True)]
    second = _cell_maps_at([images[i] for i in again], forward, second_factors, distance_map)
    found_again = _each_image(lambda k: _found_diameter(second[k][1], second_factors[k], distance_map, configs[again[k]]),
                              len(again))
    for i, diameter, factor, (maps, output), found in zip(again, remeasured, second_factors, second, found_again, strict=True):
        diameters[i], factors[i], passes[i] = diameter, factor, (maps, output)
        measured[i] = found
    return [(passes[i][0], diameters[i], factors[i], measured[i]) for i in range(len(images))]


def _found_diameter(scaled: np.ndarray, factor: float, distance_map: bool, config: PredictConfig) -> float | None:
    """The median diameter, in image pixels, of the cells of an output predicted at `factor`."""
    found = median_cell_diameter(cell_labels(maps_from_output(scaled, distance_map), config))
    return found / factor if found else None


def measured_cell_maps(
    image: np.ndarray, forward: Forward, model_config: ModelConfig, config: PredictConfig
) -> tuple[CellMaps, float | None, float]:
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
    model_diameter = float(model_config.cell_diameter)  # type: ignore[arg-type]
    distance_map = model_config.distance_map
    native = _cell_map_at(image, forward, 1.0, distance_map)
    tried: list[tuple[float, CellMaps, float, float]] = []  # (misfit, maps, diameter, factor)

    def median_diameter(scaled: np.ndarray) -> float | None:
        # Measured on the mask alone: a distance map is only right at the model's cell size and
        # splits larger cells into pieces (dsb2018 F1 0.815 measured so, 0.792 from its own split).
        return median_cell_diameter(cell_labels(CellMaps(scaled[0]), config))

    def attempt(diameter: float) -> float:
        factor = prediction_factor(diameter, model_diameter, image.shape)
        maps, scaled = native if factor == 1.0 else _cell_map_at(image, forward, factor, distance_map)
        found = median_diameter(scaled)
        misfit = float(abs(np.log(found / (diameter * factor)))) if found else np.inf
        tried.append((misfit, maps, diameter, factor))
        return misfit

    first = median_diameter(native[1])
    if first is not None and attempt(first) <= MEASURE_MISFIT:
        return tried[0][1], first, tried[0][3]
    candidates = []
    for factor in measurement_scales(image.shape)[1:]:
        diameter = median_diameter(_forward_at(image, forward, factor))
        if diameter is not None:
            candidates.append(diameter / factor)
    for diameter in distinct_sizes(candidates):
        if first is None or abs(np.log(diameter / first)) > np.log1p(SAME_SIZE):
            attempt(diameter)
    if not tried:
        return native[0], None, 1.0
    _, maps, diameter, factor = min(tried, key=lambda entry: entry[0])
    return maps, diameter, factor


def prediction_factor(cell_diameter: float | None, model_diameter: float, shape: tuple[int, ...]) -> float:
    """The factor an image of `shape` with cells `cell_diameter` across is predicted at:
    `scale_factor`, 1 within SCALE_TOLERANCE of it, else on the ladder of SCALE_STEPS steps per
    doubling (and within `scale_factor`'s bounds)."""
    factor = scale_factor(cell_diameter, model_diameter, shape)
    if abs(factor - 1.0) < SCALE_TOLERANCE:
        return 1.0
    on_ladder = 2.0 ** (round(np.log2(factor) * SCALE_STEPS) / SCALE_STEPS)
    return float(np.clip(on_ladder, 1.0 / MAX_SCALE, largest_factor(shape)))


def _resampled(image: np.ndarray, factor: float) -> np.ndarray:
    return image if factor == 1.0 else resize(image, scaled_shape(image.shape, factor), order=1)


def _forward_at(image: np.ndarray, forward: Forward, factor: float) -> np.ndarray:
    """The raw (C, h, w) output for the image resampled by `factor`, on the resampled grid."""
    return forward(_resampled(image, factor))


def _on_image_grid(output: np.ndarray, shape: tuple[int, int], factor: float, distance_map: bool) -> CellMaps:
    if factor == 1.0:
        return maps_from_output(output, distance_map)
    return maps_from_output(np.stack([np.clip(resize(channel, shape, order=1), 0.0, 1.0) for channel in output]), distance_map)


def _cell_map_at(image: np.ndarray, forward: Forward, factor: float, distance_map: bool) -> tuple[CellMaps, np.ndarray]:
    """The image predicted resampled by `factor`: its `CellMaps` back on the image's grid, and
    the raw (C, h, w) output on the resampled grid."""
    output = _forward_at(image, forward, factor)
    return _on_image_grid(output, image.shape, factor, distance_map), output


def _cell_maps_at(
    images: Sequence[np.ndarray], forward: Forwards, factors: Sequence[float], distance_map: bool
) -> list[tuple[CellMaps, np.ndarray]]:
    """`_cell_map_at` of each image at its factor, all in one call of `forward`."""
    if not images:
        return []
    outputs = forward(_each_image(lambda i: _resampled(images[i], factors[i]), len(images)))
    return _each_image(lambda i: (_on_image_grid(outputs[i], images[i].shape, factors[i], distance_map), outputs[i]),
                       len(images))


Result = TypeVar("Result")


def _each_image(step: Callable[[int], Result], count: int) -> list[Result]:
    """`step` of each index 0..count-1, in order: on threads when there are several (the images of
    a batch), each image's work its own, so the results are those of a loop."""
    if count < 2:
        return [step(index) for index in range(count)]
    return list(_image_threads().map(step, range(count)))


@cache
def _image_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(MAX_IMAGE_THREADS, available_cores())), thread_name_prefix="cellseg-images")
