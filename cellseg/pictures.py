"""Pictures for people: training curves, validation overlays and segmentation montages (PNG).

Curves are drawn with matplotlib's headless Agg backend, grids of images with Pillow, so they
work on servers and workers without a display. Each function writes one PNG to a local path or any fsspec URL and returns its URL;
`png_markdown` makes a PNG a markdown image that carries its own pixels (for Prefect artifacts,
which cannot reach files on a worker's disk or in a bucket).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
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
PANEL_SIDE = 384  # pixels of a montage or gallery panel's longer side, at most
TITLE_HEIGHT = 18  # pixels above each panel for its title
TITLE_FONT_SIZE = 12
GRID_MARGIN = 8


def _pyplot():
    """matplotlib's pyplot, headless; imported on first use, as only the training curves need it
    (half a second of every `cellseg predict` start otherwise)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(figure, url: str, storage_options: StorageOptions = None) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(figure)
    return write_bytes(url, buffer.getvalue(), storage_options)


def _display(image: np.ndarray) -> np.ndarray:
    """A raw image scaled to [0, 1] between its 1st and 99.8th percentiles, as RGB."""
    values = image.astype(np.float32)
    low, high = (float(value) for value in np.percentile(values, (1.0, 99.8)))  # numpy's float64 would widen it
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    return np.repeat(scaled[..., None], 3, axis=2)


def outlined(image: np.ndarray, *labels: np.ndarray, colours: Sequence[tuple[float, float, float]]) -> np.ndarray:
    """RGB picture of `image` with the boundaries of each of `labels` (labels or masks) drawn on it
    in its colour."""
    picture = _display(image)
    for each, colour in zip(labels, colours, strict=True):
        picture[find_boundaries(each, mode="inner")] = colour
    return picture


def training_curves(history: Sequence[dict[str, float]], url: str, storage_options: StorageOptions = None,
                    start: Mapping[str, float] | None = None, best_epoch: int | None = None) -> str:
    """Loss and Dice per epoch, training and validation, with the best epoch marked (`best_marker`);
    a fine-tuning run's `start` (its starting weights' validation metrics) is shown as epoch 0."""
    history = [{"epoch": 0, **start}, *history] if start else list(history)
    epochs = [int(record["epoch"]) for record in history]
    figure, (loss_axis, dice_axis) = _pyplot().subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    # val_loss is plain BCE; a run whose objective adds terms also records the crops' train_bce.
    objective = any("train_bce" in record for record in history)
    curves = {loss_axis: [("train_loss", ":" if objective else "-", "C0", "train objective" if objective else "train"),
                          ("train_bce", "-", "C0", "train BCE"),
                          ("val_loss", "-o", "C1", "val BCE" if objective else "val")],
              dice_axis: [("train_dice", "-", "C0", "train"), ("val_dice", "-o", "C1", "val")]}
    for (axis, lines), metric in zip(curves.items(), ("loss", "dice"), strict=True):
        for key, style, colour, label in lines:
            if any(key in record for record in history):
                axis.plot(epochs, [record.get(key, np.nan) for record in history], style, color=colour, markersize=3,
                          label=label)
        axis.set_xlabel("epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    if (marker := best_marker(history, best_epoch)) is not None:
        dice_axis.axvline(marker[0], color="grey", linestyle="--")
        dice_axis.set_title(marker[1])
    return _save(figure, url, storage_options)


def best_marker(history: Sequence[dict[str, float]], best_epoch: int | None = None) -> tuple[int, str] | None:
    """(epoch, title) of the curves' best-epoch line: `best_epoch`, the one training kept in best.pt
    (chosen by its monitor and min_delta), else the epoch of the highest val Dice; None without
    validation."""
    if not any("val_dice" in record for record in history):
        return None
    kept = next((record for record in history if int(record["epoch"]) == best_epoch and "val_dice" in record), None)
    if kept is None:
        best = max(history, key=lambda record: record.get("val_dice", -1.0))
        return int(best["epoch"]), (f"best val Dice {best['val_dice']:.4f} at epoch {int(best['epoch'])}"
                                    + (", the start" if best["epoch"] == 0 else ""))
    return int(kept["epoch"]), (f"best.pt: epoch {int(kept['epoch'])}" + (", the start" if kept["epoch"] == 0 else "")
                                + f", val Dice {kept['val_dice']:.4f}")


def overlay_gallery(
    images: Sequence[np.ndarray], truths: Sequence[np.ndarray], predictions: Sequence[np.ndarray],
    names: Sequence[str], url: str, storage_options: StorageOptions = None, columns: int = 4,
) -> str:
    """One panel per image: the image with the true outlines (green) and the predicted ones (magenta)."""
    tiles = [_tile(outlined(*_thinned(image, truth, prediction), colours=(TRUTH_COLOUR, PREDICTION_COLOUR)))
             for image, truth, prediction in zip(images, truths, predictions, strict=True)]
    return _grid(tiles, names, url, storage_options, columns, "green: truth, magenta: prediction")


def segmentation_montage(
    images: Sequence[np.ndarray], cells: Sequence[np.ndarray], names: Sequence[str], url: str,
    storage_options: StorageOptions = None, columns: int = 3, counts: Sequence[int] | None = None,
) -> str:
    """One panel per image with the outlines of its segmented cells and their count (`counts`,
    else the largest label: the count of labels numbered 1..N)."""
    tiles = [_tile(outlined(*_thinned(image, labels), colours=(PREDICTION_COLOUR,)))
             for image, labels in zip(images, cells, strict=True)]
    counts = [int(labels.max(initial=0)) for labels in cells] if counts is None else counts
    titles = [f"{name} ({count} cells)" for name, count in zip(names, counts, strict=True)]
    return _grid(tiles, titles, url, storage_options, columns, None)


def _thinned(*arrays: np.ndarray) -> list[np.ndarray]:
    """Every n-th row and column of each of an image and its outlines' arrays, n the largest step
    that leaves the longer side at least PANEL_SIDE: outlined at full size, eight 8192² images took
    some 13 GB for panels drawn 384 pixels wide."""
    step = panel_step(arrays[0].shape)
    return [array[::step, ::step] for array in arrays]


def panel_step(shape: tuple[int, ...]) -> int:
    """The largest step between the rows and columns an image of `shape` is drawn from that leaves
    the longer side at least PANEL_SIDE (1 for a smaller image)."""
    return max(1, max(shape[:2]) // PANEL_SIDE)


def _grid(
    tiles: Sequence[Image.Image], titles: Sequence[str], url: str, storage_options: StorageOptions, columns: int,
    caption: str | None,
) -> str:
    """The tiles (`_tile`) in rows of `columns`, each under its title, drawn with Pillow: a figure
    of matplotlib's took 0.6-0.9 s of a segmentation run's end for six panels."""
    if not tiles:
        raise ValueError("no images to draw")
    font = _font()
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_width = max(tile.width for tile in tiles) + GRID_MARGIN
    cell_height = max(tile.height for tile in tiles) + TITLE_HEIGHT + GRID_MARGIN
    top = TITLE_HEIGHT if caption else 0
    # wide enough for the caption (which says what the colours mean) above one small panel too
    width = max(columns * cell_width + GRID_MARGIN, round(font.getlength(caption or "")) + 2 * GRID_MARGIN)
    canvas = Image.new("RGB", (width, top + rows * cell_height + GRID_MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    if caption:
        draw.text((GRID_MARGIN, GRID_MARGIN // 2), _fitted(caption, font, canvas.width - 2 * GRID_MARGIN), "black", font)
    for index, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        left = GRID_MARGIN + (index % columns) * cell_width
        upper = top + GRID_MARGIN + (index // columns) * cell_height
        draw.text((left, upper), _fitted(title, font, cell_width - GRID_MARGIN), "black", font)
        canvas.paste(tile, (left, upper + TITLE_HEIGHT))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=1)  # level 6 took 0.4 s of a 1184x800 montage
    return write_bytes(url, buffer.getvalue(), storage_options)


def _tile(panel: np.ndarray) -> Image.Image:
    """An RGB panel in [0, 1] as an 8-bit picture of at most PANEL_SIDE pixels a side, a small
    one enlarged a whole number of times to at least half that (scaled by nearest neighbours,
    so that outlines keep their colour)."""
    tile = Image.fromarray(np.round(np.clip(panel, 0.0, 1.0) * 255).astype(np.uint8), "RGB")
    longest = max(tile.width, tile.height)
    scale = PANEL_SIDE / longest if longest > PANEL_SIDE else float(max(1, -(-PANEL_SIDE // 2 // longest)))
    if scale != 1:
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                           Image.Resampling.NEAREST)
    return tile


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=TITLE_FONT_SIZE)
    except (AttributeError, TypeError, OSError):  # Pillow built without FreeType: its bitmap font
        return ImageFont.load_default()


def _fitted(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> str:
    """`text`, cut short with an ellipsis where it is wider than `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def png_markdown(data: bytes, alt: str, name: str = "picture", max_characters: int = EMBED_MAX_CHARACTERS,
                 max_width: int = EMBED_MAX_WIDTH) -> str:
    """`![alt](data:image/png;base64,...)`: the PNG `data` (named `name` in errors) as a markdown
    image of at most `max_characters`, scaled down to `max_width` pixels and, when still too large,
    reduced to 256 colours and scaled down further. Aspect ratio is kept. Full colour is tried
    only when the picture's raw pixels or the PNG given would fit: otherwise (a montage of noisy
    microscopy images) it never did, and encoding it cost more than the rest."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            picture = opened.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise ValueError(f"picture '{name}' is not a readable image ({error})") from error
    label = re.sub(r"[\[\]\\\s]+", " ", alt).strip()
    prefix, suffix = f"![{label}](data:image/png;base64,", ")"
    budget = max_characters - len(prefix) - len(suffix)
    width = min(picture.width, max_width)
    raw_characters = 4 * width * round(picture.height * width / picture.width)  # its RGB bytes in base64
    given_characters = 4 * len(data) / 3 * (width / picture.width) ** 2  # the PNG given, scaled alike
    colours = None if min(raw_characters, given_characters) <= budget else 256
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
    # Fast octree: the median cut Pillow uses by default took 0.2 s of a 960x680 montage's 0.25.
    quantized = picture if colours is None else picture.quantize(colours, method=Image.Quantize.FASTOCTREE)
    quantized.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
