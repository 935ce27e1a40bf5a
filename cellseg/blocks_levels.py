"""How an image read block by block is normalised exactly as the whole image would be, and each
block's intensity range for the foreground test: one pass over its blocks' cores (`cellseg.blocks`,
step 1)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cellseg.blocks_source import Source, region
from cellseg.config import NormalizationConfig
from cellseg.normalize import FLAT_RELATIVE_RANGE, histogram_lut, integer_histogram, intensity_skewness
from cellseg.stitch import BlockGrid

SAMPLE_PIXELS = 1 << 24  # pixels sampled for the percentiles of images without a histogram (not 8/16-bit)


@dataclass(frozen=True)
class Levels:
    """How an image read block by block is normalised, and each block's intensity range: from one
    pass over it (`image_levels`). 8- and 16-bit images keep their histogram (scratch
    `histogram`), whose table (`histogram_lut`) normalises exactly as `normalize_image` does the
    whole image; others use percentiles of a regular sample of SAMPLE_PIXELS pixels."""

    dtype: str
    low: float
    high: float
    invert: bool
    flat: bool
    block_min: list[float]
    block_max: list[float]
    block_sum: list[float]

    def normalise(self, values: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
        """float32 in [0, 1] for raw `values`; `lut` is the histogram's table (None: percentiles)."""
        if self.flat:
            return np.zeros(values.shape, dtype=np.float32)
        if lut is not None:
            return lut[values]
        low, high = np.float64(self.low), np.float64(self.high)
        scaled = np.clip((values.astype(np.float32, copy=False) - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return 1.0 - scaled if self.invert else scaled

    def brightest(self, block: int, lut: np.ndarray | None) -> float:
        """The highest normalised intensity in the core of `block` (the foreground test)."""
        extremes = np.array([self.block_min[block], self.block_max[block]])
        return float(self.normalise(extremes.astype(self.dtype), lut).max())


def image_levels(source: Source, grid: BlockGrid, config: NormalizationConfig, workers: int = 1
                 ) -> tuple[Levels, np.ndarray | None]:
    """(Levels, histogram or None) of an image, read one core at a time by `workers` threads."""
    dtype = np.dtype(source.dtype)
    by_histogram = dtype in (np.uint8, np.uint16)
    stride = max(1, int(np.ceil(np.sqrt(grid.shape[0] * grid.shape[1] / SAMPLE_PIXELS))))

    def scan(index: int) -> tuple[float, float, float, np.ndarray]:
        core = grid.core(index)
        pixels = region(source, core)
        if dtype.kind == "f" and not np.isfinite(pixels).all():
            raise ValueError(f"pixels in rows {core[0]}-{core[1]}, columns {core[2]}-{core[3]} are NaN or infinite; "
                             "expected finite intensities")
        part = integer_histogram(pixels) if by_histogram else pixels[(-core[0]) % stride::stride,
                                                                       (-core[2]) % stride::stride].ravel()
        return float(pixels.min()), float(pixels.max()), float(pixels.sum(dtype=np.float64)), part

    minima, maxima, sums, parts = [], [], [], []
    counts = np.zeros(1 << (8 * dtype.itemsize) if by_histogram else 0, dtype=np.int64)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for low, high, total, part in pool.map(scan, range(grid.count)):
            minima.append(low)
            maxima.append(high)
            sums.append(total)
            if by_histogram:
                counts[: len(part)] += part
            else:
                parts.append(part)
    if by_histogram:
        counts = counts[: int(max(maxima)) + 1]  # as np.bincount of the whole image
        lut = histogram_lut(counts, config)
        levels = Levels(dtype.str, 0.0, 1.0, False, lut is None, minima, maxima, sums)
        return levels, counts
    sample = np.concatenate(parts).astype(np.float32)
    low, high = (float(value) for value in np.percentile(sample, [config.low_percentile, config.high_percentile]))
    flat = high - low <= FLAT_RELATIVE_RANGE * max(abs(low), abs(high)) if dtype.kind == "f" else high <= low
    invert = bool(config.polarity == "auto" and intensity_skewness(sample) < 0)
    return Levels(dtype.str, low, high, invert, bool(flat), minima, maxima, sums), None
