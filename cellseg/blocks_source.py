"""How the block-wise steps (`cellseg.blocks`) read an image: a source read region by region,
opened by each step and closed after it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from cellseg.config import PredictConfig
from cellseg.formats import open_plane
from cellseg.io import StorageOptions
from cellseg.stitch import Box


class Source(Protocol):
    """A 2-D image read region by region: a zarr array, tifffile's zarr view, `formats_plane.Plane`."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> Any: ...

    def __getitem__(self, key: tuple[slice, slice]) -> Any: ...


SourceOpener = Callable[[], Source]


def region(source: Source, box: Box) -> np.ndarray:
    """The pixels of `box` of `source`, as numpy."""
    return np.asarray(source[box[0]:box[1], box[2]:box[3]])


@contextmanager
def opened(open_source: SourceOpener) -> Iterator[Source]:
    """A source from `open_source`, closed after use when it can be (a `formats_plane.Plane`)."""
    source = open_source()
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if callable(close):
            close()


def plane_opener(url: str, config: PredictConfig, storage_options: StorageOptions = None) -> SourceOpener:
    """Opens the plane of `url` that `config.selection` chooses, region by region."""
    return lambda: open_plane(url, config.selection, storage_options)
