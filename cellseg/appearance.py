"""What kind of image a training pair is, judged from the raw image and its cells, and how
training balances its crops over the kinds so that a rare one is not drowned by a common one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TISSUE_BACKGROUND_CV = 0.15  # bright backgrounds this textured (std / mean) are stained tissue


def image_appearance(image: np.ndarray, cells: np.ndarray) -> str:
    """'fluorescence' (cells brighter than the background), 'brightfield' (darker, on an even
    background) or 'tissue' (darker, on a textured background: stained sections), from the raw
    (H, W) image and its cell mask or labels (non-zero = cell)."""
    inside = cells > 0
    background, nuclei = image[~inside], image[inside]
    if not background.size or not nuclei.size:
        return "fluorescence"
    level = background.mean(dtype=np.float64)
    if nuclei.mean(dtype=np.float64) >= level:
        return "fluorescence"
    return "tissue" if background.std(dtype=np.float64) > TISSUE_BACKGROUND_CV * level else "brightfield"


def balanced_counts(counts: Sequence[int], kinds: Sequence[str], least_share: float) -> list[int]:
    """Crops per image so that every kind present draws at least `least_share` of an epoch's
    crops (capped at an equal share), by repeating the crops of the kinds below it.

    Kinds already above the share keep their counts; each image of a kind below it gets its count
    times that kind's factor, rounded, at least its own count. `least_share` 0 changes nothing.
    """
    if len(counts) != len(kinds):
        raise ValueError(f"{len(counts)} crop counts for {len(kinds)} images")
    present = sorted(set(kinds))
    share = min(least_share, 1.0 / len(present)) if present else 0.0
    if share <= 0.0:
        return list(counts)
    totals = {kind: sum(count for count, own in zip(counts, kinds, strict=True) if own == kind) for kind in present}
    low = {kind for kind in present if totals[kind] < share * sum(totals.values())}
    high_total = sum(totals[kind] for kind in present if kind not in low)
    # The kinds below the share each get `share` of the whole; the rest keep their crops, so the
    # whole is high_total / (1 - share * len(low)).
    whole = high_total / (1.0 - share * len(low))
    factors = {kind: max(1.0, share * whole / totals[kind]) if kind in low else 1.0 for kind in present}
    return [max(count, round(count * factors[kind])) for count, kind in zip(counts, kinds, strict=True)]
