"""How the block-wise steps (`cellseg.blocks`) read an image: a source read region by region,
opened by each step and closed after it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np

from cellseg.config import PredictConfig
from cellseg.formats import is_zarr_url, open_plane
from cellseg.formats_plane import Plane, one_line
from cellseg.formats_tiff import LAZY_SEGMENT_BYTES
from cellseg.io import ImageReadError, StorageOptions
from cellseg.plates import split_time_point
from cellseg.redact import redact_url
from cellseg.stitch import Box
from cellseg.storage_errors import storage_error


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
    """Opens the plane of `url` that `config.selection` chooses, region by region. A region that
    cannot be decoded (a damaged tile or chunk: the codec's RuntimeError, imagecodecs' DeflateError
    say) is an ImageReadError naming the file and the region: bad input, which the block tasks do
    not retry (they retried it for 42 s) and the image's failure names."""
    def open_named() -> Plane:
        plane = open_plane(url, config.selection, storage_options)
        # A zarr's chunks are its file's, which a user can store smaller (a TIFF's tiles and strips are
        # checked as it opens; a CZI, ND2 or LIF is chunked by its reader, whose stacks cannot be)
        if is_zarr_url(split_time_point(url)[0]) and plane.chunk_bytes > LAZY_SEGMENT_BYTES:
            plane.close()
            raise ImageReadError(f"'{redact_url(url)}': one chunk decodes to {plane.chunk_bytes} bytes, over the "
                                 f"{LAZY_SEGMENT_BYTES // 2**20} MiB that an image read block by block may decode at "
                                 "once (each block would decode it again): store it in smaller chunks, e.g. 1024 x 1024")
        return dataclasses.replace(plane, read_region=_named_reads(plane.read_region, url))

    return open_named


# RuntimeErrors that say nothing about the file: the process is short of threads or stopping
_NOT_THE_FILE = ("can't start new thread", "cannot schedule new futures", "Event loop is closed")


def _named_reads(read_region: Callable[[slice, slice], np.ndarray], url: str) -> Callable[[slice, slice], np.ndarray]:
    def read(rows: slice, columns: slice) -> np.ndarray:
        try:
            return read_region(rows, columns)
        except (NotImplementedError, RecursionError):
            raise
        except RuntimeError as error:
            if storage_error(url, error) is not None or any(words in str(error) for words in _NOT_THE_FILE):
                raise
            raise ImageReadError(f"'{redact_url(url)}': its region rows {rows.start}:{rows.stop}, columns "
                                 f"{columns.start}:{columns.stop} cannot be decoded ({one_line(error)})") from error

    return read
