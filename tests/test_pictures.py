"""Pictures: training curves, validation overlays and montages are real, non-blank PNGs."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFont

from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig, PredictConfig
from cellseg.infer import Predictor
from cellseg.loaded_pairs import load_pairs
from cellseg.pairs import pair_images_and_masks, split_train_val
from cellseg.pictures import (
    EMBED_MAX_CHARACTERS,
    EMBED_MAX_WIDTH,
    GRID_MARGIN,
    PANEL_SIDE,
    PREDICTION_COLOUR,
    TITLE_FONT_SIZE,
    TRUTH_COLOUR,
    best_marker,
    overlay_gallery,
    picture_markdown,
    png_markdown,
    segmentation_montage,
    training_curves,
)
from cellseg.report import CURVES_FILE, GALLERY_FILE, training_pictures


def _png(path) -> np.ndarray:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB"))


def _has_colour(pixels: np.ndarray, colour: tuple[float, float, float]) -> bool:
    target = np.round(np.array(colour) * 255)
    return bool(np.any(np.all(np.abs(pixels.astype(int) - target) <= 30, axis=-1)))


def _cells() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image = np.zeros((64, 64), dtype=np.uint8)
    truth = np.zeros((64, 64), dtype=np.int32)
    truth[10:30, 10:30], truth[35:55, 30:50] = 1, 2
    image[truth > 0] = 200
    prediction = np.zeros_like(truth)
    prediction[12:30, 10:28] = 1
    return image, truth, prediction


def test_training_curves_show_loss_and_dice(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_dice": 1 - 0.5 / e, "val_dice": 1 - 0.6 / e}
               for e in range(1, 6)]
    url = training_curves(history, str(tmp_path / "sub" / "curves.png"))
    pixels = _png(url)
    assert pixels.shape == (400, 1000, 3)
    assert pixels.std() > 10  # lines, labels and axes, not a blank canvas


def test_training_curves_draw_a_fine_tuning_runs_starting_weights_as_epoch_0(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_dice": 0.5, "val_dice": 0.5}
               for e in range(1, 4)]
    start = {"val_loss": 0.3, "val_dice": 0.9}
    without = _png(training_curves(history, str(tmp_path / "without.png")))
    with_start = _png(training_curves(history, str(tmp_path / "with.png"), start=start))
    assert without.shape == with_start.shape and not np.array_equal(without, with_start)
    # The history itself is left as it was: epochs trained only.
    assert [record["epoch"] for record in history] == [1, 2, 3]


def test_training_curves_draw_the_training_bce_beside_the_objective_when_they_differ(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 0.5 / e, "train_dice": 0.5, "val_dice": 0.5}
               for e in range(1, 4)]
    plain = _png(training_curves(history, str(tmp_path / "plain.png")))
    with_bce = _png(training_curves([{**record, "train_bce": 0.6 / record["epoch"]} for record in history],
                                    str(tmp_path / "bce.png")))
    assert plain.shape == with_bce.shape
    loss_half = (slice(None), slice(0, plain.shape[1] // 2))
    assert not np.array_equal(plain[loss_half], with_bce[loss_half])


def test_training_curves_mark_the_epoch_best_pt_holds():
    """best.pt is chosen by the monitor: with --monitor val_loss it need not be the epoch of the
    highest val Dice, and the line marks best.pt's epoch."""
    history = [{"epoch": 1, "val_loss": 0.30, "val_dice": 0.80}, {"epoch": 2, "val_loss": 0.35, "val_dice": 0.85}]
    assert best_marker(history, best_epoch=1) == (1, "best.pt: epoch 1, val Dice 0.8000")
    assert best_marker([{"epoch": 0, "val_dice": 0.9}, *history], best_epoch=0) == (0, "best.pt: epoch 0, the start, "
                                                                                     "val Dice 0.9000")
    assert best_marker(history) == (2, "best val Dice 0.8500 at epoch 2")  # not told: the highest val Dice
    assert best_marker([{"epoch": 1, "train_dice": 0.5}], best_epoch=1) is None  # no validation, no line


def test_overlay_gallery_draws_truth_and_prediction_outlines(tmp_path):
    image, truth, prediction = _cells()
    pixels = _png(overlay_gallery([image, image], [truth, truth], [prediction, prediction], ["a", "b"],
                                  str(tmp_path / "gallery.png")))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 200
    assert _has_colour(pixels, TRUTH_COLOUR) and _has_colour(pixels, PREDICTION_COLOUR)


def test_a_gallery_of_one_small_image_keeps_its_caption_and_is_enlarged(tmp_path):
    """One 100x70 validation image: its panel is enlarged a whole number of times to at least half
    of PANEL_SIDE, and the caption saying which colour is which is not cut short."""
    image, truth, prediction = (np.pad(array, ((0, 6), (0, 36))) for array in _cells())  # 70x100
    url = overlay_gallery([image], [truth], [prediction], ["a"], str(tmp_path / "gallery.png"))
    pixels = _png(url)
    caption = ImageFont.load_default(size=TITLE_FONT_SIZE).getlength("green: truth, magenta: prediction")
    assert pixels.shape[1] >= caption + 2 * GRID_MARGIN
    assert pixels.shape[1] >= 2 * 100 >= PANEL_SIDE // 2  # the panel drawn twice its size


def test_montage_draws_cell_outlines(tmp_path):
    image, truth, _ = _cells()
    pixels = _png(segmentation_montage([image], [truth], ["a"], str(tmp_path / "montage.png")))
    assert _has_colour(pixels, PREDICTION_COLOUR) and not _has_colour(pixels, TRUTH_COLOUR)


def test_training_pictures_next_to_the_checkpoint(tiny_checkpoint, synthetic_dataset):
    run = tiny_checkpoint.parent
    model = ModelConfig(depth=3, base_width=8)
    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    _, val_pairs = split_train_val(pairs, 0.2, 0)
    history = json.loads((run / "history.json").read_text())
    predictor = Predictor(load_checkpoint(str(run / "best.pt")), PredictConfig(device="cpu"))
    written = training_pictures(run, history, load_pairs(val_pairs, model.normalization), predictor)
    assert written == [str(run / CURVES_FILE), str(run / GALLERY_FILE)]
    gallery = _png(run / GALLERY_FILE)
    assert _has_colour(gallery, TRUTH_COLOUR) and _has_colour(gallery, PREDICTION_COLOUR)


# --- pictures embedded in markdown (Prefect artifacts) ------------------------------------

EMBEDDED = re.compile(r"!\[([^\]]*)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def embedded_png(markdown: str) -> tuple[str, Image.Image]:
    """(alt text, decoded picture) of the one embedded PNG in `markdown`."""
    (alt, data), = EMBEDDED.findall(markdown)
    picture = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert picture.format == "PNG"
    return alt, picture


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_small_picture_is_embedded_pixel_for_pixel(tmp_path):
    url = training_curves([{"epoch": 1, "train_loss": 1.0, "val_dice": 0.5}, {"epoch": 2, "train_loss": 0.5, "val_dice": 0.7}],
                          str(tmp_path / "curves.png"))
    markdown = picture_markdown(url, "curves of [model] 1\nsecond line")

    alt, picture = embedded_png(markdown)
    assert markdown == f"![{alt}]({markdown.split('](', 1)[1]}"  # nothing around the image
    assert alt == "curves of model 1 second line"  # brackets and line breaks would end the image early
    assert len(markdown) <= EMBED_MAX_CHARACTERS
    np.testing.assert_array_equal(np.asarray(picture.convert("RGB")), _png(url))


def test_a_wide_picture_is_scaled_to_the_width_the_ui_shows():
    pixels = np.zeros((300, 2 * EMBED_MAX_WIDTH, 3), dtype=np.uint8)
    pixels[:, ::2] = (255, 0, 200)  # stripes: a few colours, a small PNG at any size

    _, picture = embedded_png(png_markdown(_png_bytes(pixels), "stripes"))

    assert picture.size == (EMBED_MAX_WIDTH, 150)


def test_a_picture_too_large_for_the_bound_is_reduced_until_it_fits():
    noise = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)  # compresses to ~720 KB
    bound = 60_000

    markdown = png_markdown(_png_bytes(noise), "noise", max_characters=bound)

    _, picture = embedded_png(markdown)
    assert len(markdown) <= bound
    assert 64 <= picture.width < 600 and picture.height == round(400 * picture.width / 600)  # aspect ratio kept


def test_what_is_not_a_picture_is_refused_by_name():
    with pytest.raises(ValueError, match=r"picture 'notes\.txt' is not a readable image"):
        png_markdown(b"epoch,loss\n1,0.5\n", "notes", name="notes.txt")


def test_a_run_montage_asks_the_store_about_its_first_images_only(tmp_path):
    """A nightly run of 100,000 images must not read every image's record to draw six."""
    from cellseg.report import store_montage
    from cellseg.stats import image_statistics
    from cellseg.store import ResultStore

    image, truth, _ = _cells()
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    for index in range(3):
        store.write_result(f"im{index}", truth > 0, image_statistics(image, truth), f"im{index}.png", {"version": "v"},
                           cells=truth, image=image)

    def images():
        yield ("missing", "missing.png")  # not done: skipped
        yield from ((f"im{index}", f"im{index}.png") for index in range(3))
        raise AssertionError("the montage asked about images past the ones it shows")

    montage = store_montage(store, images(), str(tmp_path / "montage.png"), max_images=3)
    assert montage is not None and _has_colour(_png(montage), PREDICTION_COLOUR)


def test_a_run_montage_reads_large_images_at_about_its_panel_size(tmp_path):
    """Six 2048² images read whole took 931 MB to draw; one drawn from its source file (no image
    copy in the store) and one from the store's copy both take a small part of one whole read."""
    import tracemalloc

    from cellseg.report import store_montage
    from cellseg.store import ResultStore

    side, period = 4096, 32
    rows, columns = np.mgrid[:side, :side]
    inside = ((rows % period) - period // 2) ** 2 + ((columns % period) - period // 2) ** 2 < 100
    cells = np.where(inside, (rows // period) * (side // period) + columns // period + 1, 0).astype(np.int32)
    image = np.where(inside, 200, 20).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "source.png")
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    count = int(cells.max())
    store.write_result("copied", inside, {"cell_count": count}, "copied.png", {"version": "v"}, cells=cells, image=image)
    store.write_result("from-source", inside, {"cell_count": count}, str(tmp_path / "source.png"), {"version": "v"},
                       cells=cells)
    whole = cells.nbytes + image.nbytes
    del rows, columns, inside, cells, image

    tracemalloc.start()
    try:
        montage = store_montage(store, [("copied", "copied.png"), ("from-source", str(tmp_path / "source.png"))],
                                str(tmp_path / "montage.png"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert montage is not None and _has_colour(_png(montage), PREDICTION_COLOUR)
    assert peak < whole, (peak, whole)  # the source PNG alone is decoded whole, the store's arrays not
    with Image.open(montage) as picture:
        assert picture.width < 2 * 3 * PANEL_SIDE


def test_a_validation_gallery_of_large_images_outlines_them_at_about_its_panel_size(tmp_path):
    """Outlined at full size, each 4096² panel took 200 MB of RGB (400 MB as float64), all kept
    until the grid was drawn."""
    import tracemalloc

    side = 4096
    rows, columns = np.mgrid[:side, :side]
    truth = ((rows % 32) - 16) ** 2 + ((columns % 32) - 16) ** 2 < 100
    image, prediction = np.where(truth, 200, 20).astype(np.uint8), np.roll(truth, 3, axis=1)
    del rows, columns
    tracemalloc.start()
    try:
        gallery = overlay_gallery([image, image], [truth, truth], [prediction, prediction], ["a", "b"],
                                  str(tmp_path / "g.png"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < image.nbytes // 2, peak  # an eighth of one full-size float32 copy of the image
    pixels = _png(gallery)
    assert _has_colour(pixels, TRUTH_COLOUR) and _has_colour(pixels, PREDICTION_COLOUR)


def test_matplotlib_loads_only_when_the_training_curves_are_drawn(tmp_path):
    """Half a second of every `cellseg predict` start went to importing pyplot for a picture that
    only training draws."""
    program = ("import sys\nimport cellseg.cli, cellseg.jobs, cellseg.report\n"
               "before = 'matplotlib' in sys.modules\n"
               "from cellseg.pictures import training_curves\n"
               "training_curves([{'epoch': 1, 'train_loss': 0.5, 'val_loss': 0.4, 'val_dice': 0.8}], sys.argv[1])\n"
               "print(before, 'matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "curves.png")], check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
