"""File names holding terminal escape sequences (issue 19): `cellseg` prints file names in its
failures, warnings, tables and log lines, and a name like `evil<ESC>]0;title<BEL>.png` must be
shown escaped, never sent raw to the terminal it is printed on."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.synth import encode_png, generate_sample
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

FAILING = "evil\x1b]0;pwned\x07\x1b[2J.png"  # sets the window title, clears the screen
WARNED = "flat\x1b[31m.png"  # a constant image: done with a warning that names it


def test_escape_sequences_in_file_names_are_shown_escaped(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(encode_png(generate_sample(np.random.default_rng(5), (64, 64)).image))
    (images / FAILING).write_text("not an image\n")
    (images / WARNED).write_bytes(encode_png(np.zeros((32, 32), np.uint8)))
    store = tmp_path / "store"

    predicted = cellseg("predict", "--images", str(images), "--out", str(store), "--model", "general", check=False)
    listed = cellseg("results", str(store), check=False)

    assert predicted.returncode == 3, predicted.stderr
    assert listed.returncode == 0, listed.stderr
    for output in (predicted.stdout, predicted.stderr, listed.stdout, listed.stderr):
        assert "\x1b" not in output and "\x07" not in output
        assert "Traceback" not in output
    assert r"evil\x1b]0;pwned\x07\x1b[2J.png" in predicted.stdout  # the failure, named
    assert r"flat\x1b[31m.png" in predicted.stdout  # the warning, named
    assert r"evil\x1b]0;pwned\x07\x1b[2J.png" in listed.stdout
