"""What a results store holds where: its layout version, the paths, dtypes and chunking of an
image's arrays, and the errors zarr raises reading them (the layout itself: `cellseg.store`)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

import cellseg.store_codecs  # noqa: F401  (zstd chunks bounded before they inflate)

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

LAYOUT_VERSION = 1
MASK_NAME = "mask"
CELLS_NAME = "cells"
CHUNK_SIDE = 1024
CELL_TABLE = "tables/cells"
TABLE_CHUNK_ROWS = 65536
IMAGE_PATH = "0"
PROBABILITIES_PATH = "probabilities/0"
MASK_PATH = f"labels/{MASK_NAME}/0"
CELLS_PATH = f"labels/{CELLS_NAME}/0"
# An image's arrays by path in its group: what each holds (for messages) and its dtype (None: any).
ARRAYS: dict[str, tuple[str, str | None]] = {
    IMAGE_PATH: ("copy of the source image", None),
    MASK_PATH: ("mask", "uint8"),
    CELLS_PATH: ("cell labels", "int32"),
    PROBABILITIES_PATH: ("probabilities", "float16"),
    CELL_TABLE: ("cell table", "float64"),
}
# The entries at the top of an image's group: its arrays' folders and the block-wise scratch.
IMAGE_FOLDERS = frozenset({path.split("/")[0] for path in ARRAYS} | {"blocks"})

StoreMode = Literal["r", "r+", "a", "w", "w-"]  # zarr's access modes
# What zarr raises for a zarr.json it cannot parse or validate (JSONDecodeError is a ValueError;
# 100,000 nested brackets, a RecursionError).
METADATA_ERRORS = (ValueError, TypeError, RecursionError)
# What the codecs raise for chunk bytes they cannot decode (zstd: RuntimeError).
CHUNK_ERRORS = (RuntimeError, ValueError, TypeError)
WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}


def now() -> str:
    """The time a record is stamped with: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
