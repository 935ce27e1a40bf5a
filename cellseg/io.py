"""Listing and decoding images and masks from any fsspec URL (local paths, file://, s3://)."""

from __future__ import annotations

import io
import logging
import os
import posixpath
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import fsspec
import numpy as np
import tifffile
from fsspec.core import url_to_fs
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DEFAULT_MAX_PIXELS = 16_384 * 16_384

# The pixel limit is enforced by `max_pixels` below, before decoding; Pillow's own global guard
# would otherwise refuse large microscopy tiles at a fixed size the caller cannot change.
Image.MAX_IMAGE_PIXELS = None

StorageOptions = Mapping[str, Any] | None

_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for `url` and the path inside it."""
    return url_to_fs(url, **dict(storage_options or {}))


def join_url(base: str, name: str) -> str:
    """Join a file name onto a directory URL, keeping the protocol."""
    return base.rstrip("/") + "/" + name


def image_stem(url: str) -> str:
    """File name without its last suffix: the image id."""
    name = posixpath.basename(url.rstrip("/"))
    stem, _ = posixpath.splitext(name)
    return stem


@dataclass(frozen=True)
class FileEntry:
    """A listed file: its URL, size in bytes and a fingerprint that changes when its content does."""

    url: str
    size: int
    fingerprint: str


def list_image_entries(url: str, storage_options: StorageOptions = None) -> list[FileEntry]:
    """Image files directly under the directory `url`, sorted by name.

    The fingerprint is the object's ETag on object storage, its modification time elsewhere.
    """
    fs, root = filesystem(url, storage_options)
    # fsspec reuses filesystem instances per process, and s3fs caches listings: without this, a
    # second listing in the same process misses new and changed objects.
    fs.invalidate_cache(root)
    try:
        if not fs.isdir(root):
            raise FileNotFoundError(f"image directory '{url}' does not exist or is not a directory")
        listing = fs.ls(root, detail=True)
    except PermissionError as error:
        raise PermissionError(f"access denied listing '{url}': {error}") from error
    entries, ignored = [], []
    for listed in listing:
        name = posixpath.basename(listed["name"].rstrip("/"))
        entry = _followed_link(listed) if listed.get("islink") else listed
        if entry.get("type") != "file":
            continue
        if not name.lower().endswith(IMAGE_SUFFIXES):
            ignored.append(name)
            continue
        version = entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified") or ""
        entries.append(FileEntry(join_url(url, name), int(entry.get("size") or 0), f"{entry.get('size')}:{version}"))
    if ignored:
        shown = ", ".join(sorted(ignored)[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        logger.warning("ignoring %d file(s) under '%s' without an image suffix (%s): %s",
                       len(ignored), url, " ".join(IMAGE_SUFFIXES), shown)
    return sorted(entries, key=lambda entry: entry.url)


def _followed_link(entry: dict) -> dict:
    """A local symbolic link's listing entry with its target's type, size and modification time
    (fsspec lists links as type 'other'); a dangling link stays 'other' and is skipped."""
    try:
        target = os.stat(entry["name"])
    except OSError:
        return entry
    kind = "file" if stat.S_ISREG(target.st_mode) else "directory" if stat.S_ISDIR(target.st_mode) else "other"
    return {**entry, "type": kind, "size": target.st_size, "mtime": target.st_mtime}


def list_images(url: str, storage_options: StorageOptions = None) -> list[str]:
    """Sorted URLs of the image files directly under the directory `url`."""
    return [entry.url for entry in list_image_entries(url, storage_options)]


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    """Whole file contents of `url`."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise ImageReadError(f"'{url}': file not found") from error


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> str:
    """Write `data` to a file at `url` (local path or any fsspec URL), creating its directory; returns `url`."""
    fs, path = filesystem(url, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return url


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file so that readers see the old or the new contents, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def decode_image(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG/TIFF/JPEG bytes to a 2-D (H, W) array, colour converted to grayscale.

    8- and 16-bit integer and float images keep their dtype; RGB(A) and palette images become
    uint8 luma (ITU-R 601). Raises ImageReadError naming `name` for anything unusable.
    """
    if not data:
        raise ImageReadError(f"'{name}': file is empty (0 bytes)")
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        array = _decode_tiff(data, name, max_pixels)
    else:
        array = _decode_with_pillow(data, name, max_pixels)
    if array.ndim != 2 or min(array.shape) < 1:
        raise ImageReadError(f"'{name}': expected a 2-D grayscale image, got shape {array.shape}")
    return array


def _decode_tiff(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = cast(tifffile.TiffPage, tif.pages[0])  # the first page is a TiffPage, never a TiffFrame
            _check_pixel_limit(name, page.shape[0] * page.shape[1], max_pixels)
            array = page.asarray()
    except ImageReadError:
        raise
    except Exception as error:  # tifffile raises many types on malformed input
        raise ImageReadError(f"'{name}': not a readable TIFF ({error})") from error
    if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.shape[0] in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar RGB(A) is stored samples-first: (S, H, W)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = _luma(array[..., :3])
    elif array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return array


def _decode_with_pillow(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_pixel_limit(name, opened.width * opened.height, max_pixels)
            opened.load()
            to_gray = opened.mode in ("RGB", "RGBA", "P", "PA", "LA", "CMYK", "YCbCr", "1")
            array = np.asarray(opened.convert("L") if to_gray else opened)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"'{name}': not a readable image ({error})") from error
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # Pillow's 'I' mode for 16-bit PNGs
    return array


def _check_pixel_limit(name: str, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageReadError(
            f"'{name}': {pixels} pixels exceeds the limit of {max_pixels} (raise max_pixels to allow it)"
        )


def _luma(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = rgb.astype(np.float32) @ weights
    return np.clip(np.rint(gray), 0, np.iinfo(rgb.dtype).max if rgb.dtype.kind in "ui" else None).astype(rgb.dtype)


def read_image(url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image file into a 2-D (H, W) array."""
    return decode_image(read_bytes(url, storage_options), url, max_pixels)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask: any value above zero is cell (masks valued 0/1 and 0/255 both work)."""
    return mask > 0


def read_mask(url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask file into a boolean (H, W) array."""
    return binarize_mask(read_image(url, storage_options, max_pixels))
