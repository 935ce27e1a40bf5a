"""Per-image intensity normalisation to [0, 1] between percentiles, with optional inversion so
that objects are bright in every modality."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from cellseg.config import NormalizationConfig

# Float images whose percentiles differ by less than this fraction of their magnitude hold only
# rounding noise (a few float32 steps), which stretching to [0, 1] would turn into "structure".
FLAT_RELATIVE_RANGE = 16 * float(np.finfo(np.float32).eps)


def intensity_skewness(image: np.ndarray) -> float:
    """Sample skewness of the pixel intensities (0 for a flat image), summed in float64 over bands
    of SKEWNESS_BAND_PIXELS: whole, its float64 copies took 32 bytes a pixel, 2.1 GB of an 8192²
    float image whose normalisation otherwise takes some 800 MB."""
    pixels = image.ravel()
    count = pixels.size
    bands = [pixels[start:start + SKEWNESS_BAND_PIXELS] for start in range(0, count, SKEWNESS_BAND_PIXELS)]
    mean = sum(float(np.sum(band, dtype=np.float64)) for band in bands) / max(count, 1)
    second = third = 0.0
    for band in bands:
        centred = band.astype(np.float64) - mean
        squared = centred * centred
        second += float(squared.sum())
        third += float(np.dot(squared, centred))
    spread = math.sqrt(second / max(count, 1))
    return 0.0 if spread == 0 else third / count / spread**3  # a float, never numpy's: it goes into JSON records


SKEWNESS_BAND_PIXELS = 1 << 20


def _histogram_statistics(counts: np.ndarray, percentiles: Sequence[float]) -> tuple[list[float], float]:
    """np.percentile's linear-interpolation percentiles and the skewness of an integer image, from
    its histogram: one pass over the pixels instead of a partial sort and several float passes."""
    total = int(counts.sum())
    cumulative = np.cumsum(counts)
    values = []
    for percentile in percentiles:
        position = (total - 1) * percentile / 100
        below = int(np.floor(position))
        low_value = float(np.searchsorted(cumulative, below, side="right"))
        high_value = float(np.searchsorted(cumulative, min(below + 1, total - 1), side="right"))
        fraction = position - below
        # numpy's lerp, including its symmetric form for fractions of one half and above
        values.append(high_value - (high_value - low_value) * (1 - fraction) if fraction >= 0.5
                      else low_value + (high_value - low_value) * fraction)
    levels = np.arange(len(counts), dtype=np.float64)
    mean = float(counts @ levels) / total
    centred = levels - mean
    spread = np.sqrt(float(counts @ centred**2) / total)
    skewness = 0.0 if spread == 0 else float(counts @ centred**3) / total / spread**3
    return values, skewness


def normalize_image(image: np.ndarray, config: NormalizationConfig = NormalizationConfig()) -> np.ndarray:
    """Map (H, W) intensities to float32 in [0, 1] between the configured percentiles.

    With polarity 'auto', a negatively skewed image (mostly bright, with a dark minority such as
    dark nuclei on brightfield) is inverted, so one model sees objects bright in both modalities.
    8- and 16-bit images go through their histogram and a lookup table (20x faster here, equal to
    the np.percentile path within float32 rounding); other dtypes through np.percentile.
    """
    percentiles = [config.low_percentile, config.high_percentile]
    if image.dtype in (np.uint8, np.uint16):
        counts = integer_histogram(image)
        (low, high), skewness = _histogram_statistics(counts, percentiles)
        levels: np.ndarray = np.arange(len(counts), dtype=np.float32)
    else:
        levels = image.astype(np.float32, copy=False)
        low, high = np.percentile(levels, percentiles)
        skewness = intensity_skewness(levels) if config.polarity == "auto" else 0.0
    if _no_contrast(float(low), float(high), image.dtype):  # flat image: nothing to stretch
        return np.zeros(image.shape, dtype=np.float32)
    scaled = np.clip((levels - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)
    if config.polarity == "auto" and skewness < 0:
        scaled = 1.0 - scaled
    if image.dtype == np.uint8:
        return cv2.LUT(np.ascontiguousarray(image), scaled)  # numpy's scaled[image], in half its time
    return scaled[image] if image.dtype == np.uint16 else scaled


def integer_histogram(image: np.ndarray) -> np.ndarray:
    """`np.bincount` of an 8- or 16-bit image's pixels, for 8 bits over all 256 levels: counted
    by OpenCV (4x faster here) while its float32 counts are exact (fewer than 2**24 pixels)."""
    if image.dtype != np.uint8:
        return np.bincount(image.ravel())
    if image.size < EXACT_FLOAT32_COUNT:
        return cv2.calcHist([np.ascontiguousarray(image)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    return np.bincount(image.ravel(), minlength=256)


EXACT_FLOAT32_COUNT = 1 << 24


def histogram_lut(counts: np.ndarray, config: NormalizationConfig = NormalizationConfig()) -> np.ndarray | None:
    """The float32 table through which `normalize_image` maps an 8- or 16-bit image, from the
    image's histogram (`np.bincount` of its pixels; summed over its parts, for an image read block
    by block): `lut[image]` equals `normalize_image(image, config)`. None without contrast."""
    (low, high), skewness = _histogram_statistics(counts, [config.low_percentile, config.high_percentile])
    if _no_contrast(low, high, np.dtype(np.uint16)):
        return None
    levels = np.arange(len(counts), dtype=np.float32)
    scaled = np.clip((levels - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)
    return 1.0 - scaled if config.polarity == "auto" and skewness < 0 else scaled


def flat_level(image: np.ndarray, config: NormalizationConfig = NormalizationConfig()) -> float | None:
    """The intensity of an (H, W) image without contrast between the configured percentiles (a
    constant image, or one whose pixels all but a sliver share one value), else None.

    `normalize_image` maps such an image to zeros: there is nothing in it to segment, and a
    model shown a blank input would report its own biases as cells.
    """
    percentiles = [config.low_percentile, config.high_percentile]
    if image.dtype in (np.uint8, np.uint16):
        (low, high), _ = _histogram_statistics(integer_histogram(image), percentiles)
    else:
        values = image.view(np.uint8) if image.dtype == np.bool_ else image  # bilevel TIFFs
        low, high = (float(value) for value in np.percentile(values, percentiles))
    return low if _no_contrast(low, high, image.dtype) else None


def _no_contrast(low: float, high: float, dtype: np.dtype) -> bool:
    """Whether percentiles `low` and `high` of an image of `dtype` leave nothing to stretch."""
    if dtype.kind == "f":
        return high - low <= FLAT_RELATIVE_RANGE * max(abs(low), abs(high))
    return high <= low
