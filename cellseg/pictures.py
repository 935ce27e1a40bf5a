"""Pictures for people: training curves, validation overlays and segmentation montages (PNG).

Drawn with matplotlib's headless Agg backend, so they work on servers and workers without a
display. Each function writes one PNG to a local path or any fsspec URL and returns its URL;
`png_markdown` makes a PNG a markdown image that carries its own pixels (for Prefect artifacts,
which cannot reach files on a worker's disk or in a bucket).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.segmentation import find_boundaries

from cellseg.io import StorageOptions, read_bytes, write_bytes
from cellseg.redact import redact_url

TRUTH_COLOUR = (0.1, 0.9, 0.2)  # green
PREDICTION_COLOUR = (1.0, 0.1, 0.8)  # magenta
DPI = 100
# An embedded picture is stored in Prefect's database with its artifact and loaded whole by the
# UI's artifact pages; Prefect sets no limit of its own, so cellseg keeps each one this small.
EMBED_MAX_CHARACTERS = 300_000
EMBED_MAX_WIDTH = 1280  # wider than the UI shows it
_MIN_WIDTH = 64


def _save(figure, url: str, storage_options: StorageOptions = None) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return write_bytes(url, buffer.getvalue(), storage_options)


def _display(image: np.ndarray) -> np.ndarray:
    """A raw image scaled to [0, 1] between its 1st and 99.8th percentiles, as RGB."""
    values = image.astype(np.float32)
    low, high = np.percentile(values, (1.0, 99.8))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    return np.repeat(scaled[..., None], 3, axis=2)


def outlined(image: np.ndarray, outlines: Sequence[tuple[np.ndarray, tuple[float, float, float]]]) -> np.ndarray:
    """RGB picture of `image` with the boundaries of each (labels or mask, colour) pair drawn on it."""
    picture = _display(image)
    for labels, colour in outlines:
        picture[find_boundaries(labels, mode="inner")] = colour
    return picture


def training_curves(history: Sequence[dict[str, float]], url: str, storage_options: StorageOptions = None) -> str:
    """Loss and Dice per epoch, training and validation, with the best validation epoch marked."""
    epochs = [int(record["epoch"]) for record in history]
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for axis, metric in ((loss_axis, "loss"), (dice_axis, "dice")):
        for split, style in (("train", "-"), ("val", "-o")):
            key = f"{split}_{metric}"
            if any(key in record for record in history):
                axis.plot(epochs, [record.get(key, np.nan) for record in history], style, markersize=3, label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    if any("val_dice" in record for record in history):
        best = max(history, key=lambda record: record.get("val_dice", -1.0))
        dice_axis.axvline(best["epoch"], color="grey", linestyle="--")
        dice_axis.set_title(f"best val Dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}")
    return _save(figure, url, storage_options)


def overlay_gallery(
    images: Sequence[np.ndarray], truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
    names: Sequence[str], url: str, storage_options: StorageOptions = None, columns: int = 4,
) -> str:
    """One panel per image: the image with the true outlines (green) and the predicted ones (magenta)."""
    panels = [outlined(image, [(truth, TRUTH_COLOUR), (prediction, PREDICTION_COLOUR)])
              for image, truth, prediction in zip(images, truths, predictions, strict=True)]
    return _grid(panels, names, url, storage_options, columns, "green: truth, magenta: prediction")


def segmentation_montage(
    images: Sequence[np.ndarray], cells: Sequence[np.ndarray], names: Sequence[str], url: str,
    storage_options: StorageOptions = None, columns: int = 3,
) -> str:
    """One panel per image with the outlines of its segmented cells and their count."""
    panels = [outlined(image, [(labels, PREDICTION_COLOUR)]) for image, labels in zip(images, cells, strict=True)]
    titles = [f"{name} ({int(labels.max())} cells)" for name, labels in zip(names, cells, strict=True)]
    return _grid(panels, titles, url, storage_options, columns, None)


def _grid(panels, titles, url, storage_options, columns, caption) -> str:
    if not panels:
        raise ValueError("no images to draw")
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False,
                                constrained_layout=True)
    for axis in axes.flat:
        axis.axis("off")
    # The last row may have more axes than there are panels left: those stay blank.
    for axis, (panel, title) in zip(axes.flat, zip(panels, titles, strict=True), strict=False):
        axis.imshow(panel, interpolation="nearest")
        axis.set_title(title, fontsize=8)
    if caption:
        figure.suptitle(caption, fontsize=9)
    return _save(figure, url, storage_options)


def png_markdown(data: bytes, alt: str, name: str = "picture", max_characters: int = EMBED_MAX_CHARACTERS,
                 max_width: int = EMBED_MAX_WIDTH) -> str:
    """`![alt](data:image/png;base64,...)`: the PNG `data` (named `name` in errors) as a markdown
    image of at most `max_characters`, scaled down to `max_width` pixels and, when still too large,
    reduced to 256 colours and scaled down further. Aspect ratio is kept."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            picture = opened.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise ValueError(f"picture '{name}' is not a readable image ({error})") from error
    label = re.sub(r"[\[\]\\\s]+", " ", alt).strip()
    prefix, suffix = f"![{label}](data:image/png;base64,", ")"
    budget = max_characters - len(prefix) - len(suffix)
    width, colours = min(picture.width, max_width), None
    encoded = _png_base64(_scaled(picture, width), colours)
    while len(encoded) > budget:
        if colours is None:
            colours = 256  # fewer colours before fewer pixels: outlines and text stay sharp
        elif width > _MIN_WIDTH:
            width = max(_MIN_WIDTH, int(width * 0.75))
        else:
            raise ValueError(f"picture '{name}' does not fit in {max_characters} characters even at {width} "
                             f"pixels wide")
        encoded = _png_base64(_scaled(picture, width), colours)
    return prefix + encoded + suffix


def picture_markdown(url: str, alt: str, storage_options: StorageOptions = None) -> str:
    """The PNG at `url` (a local path or any fsspec URL) as an embedded markdown image (`png_markdown`)."""
    return png_markdown(read_bytes(url, storage_options), alt, name=redact_url(url))


def _scaled(picture: Image.Image, width: int) -> Image.Image:
    if width >= picture.width:
        return picture
    return picture.resize((width, max(1, round(picture.height * width / picture.width))), Image.Resampling.LANCZOS)


def _png_base64(picture: Image.Image, colours: int | None) -> str:
    buffer = io.BytesIO()
    (picture if colours is None else picture.quantize(colours)).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
