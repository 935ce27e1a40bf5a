"""Listing and decoding images and masks from any fsspec URL (local paths, file://, s3://)."""

from __future__ import annotations

import io
import json
import logging
import lzma
import os
import posixpath
import re
import stat
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from typing import Any, cast

import fsspec
import numpy as np
import tifffile
from fsspec.core import url_to_fs
from PIL import Image, UnidentifiedImageError

from cellseg import png
from cellseg.bounded_reads import bounded_cat, is_empty, is_local, protocols
from cellseg.plates import image_id
from cellseg.redact import credentials_in_bucket_url, redact_url
from cellseg.storage_errors import StorageError, storage_call

logger = logging.getLogger(__name__)

# Object stores, where a folder is only a prefix of its objects' names: none is left empty.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MICROSCOPY_FILE_SUFFIXES = (".czi", ".nd2", ".lif")  # read by bioio plugins (cellseg.formats)
ZARR_FOLDER_SUFFIX = ".zarr"  # an OME-Zarr image or plate: one source, never a folder to recurse into
DEFAULT_MAX_PIXELS = 16_384 * 16_384
# Decoded bytes allowed per pixel of `max_pixels` (16-bit RGBA, or float64 grayscale), so that
# samples, planes and wide types cannot multiply the memory that max_pixels grants.
MAX_BYTES_PER_PIXEL = 8
# A file may hold this much beside its pixels (metadata, thumbnails) before it is refused unread.
MAX_EXTRA_FILE_BYTES = 64 * 2**20

# Decoders by content, whatever the suffix: TIFF (by its magic number) goes to tifffile, PNG and
# JPEG to Pillow; no other Pillow plugin ever parses a file (EPS would run Ghostscript).
PILLOW_FORMATS = ("PNG", "JPEG")
SUPPORTED_FORMATS = "PNG, TIFF or JPEG"
# TIFF compressions decoded, by tag value. Segments of the inflating ones are sized (bounded)
# before tifffile decodes them: its fallback decoders ignore the expected size.
TIFF_COMPRESSIONS = {1: "none", 5: "LZW", 7: "JPEG", 8: "Deflate", 32946: "Deflate", 32773: "PackBits", 34925: "LZMA"}
_TIFF_DEFLATE, _TIFF_PACKBITS, _TIFF_LZMA = (8, 32946), 32773, 34925
# Signatures of common non-image files that no Pillow plugin recognises, to name them in errors.
_OTHER_SIGNATURES = {b"%PDF-": "PDF", b"PK\x03\x04": "ZIP", b"\x1f\x8b": "gzip"}

# The pixel limit is enforced by `max_pixels` below, before decoding; Pillow's own global guard
# would otherwise refuse large microscopy tiles at a fixed size the caller cannot change.
Image.MAX_IMAGE_PIXELS = None

StorageOptions = Mapping[str, Any] | None

# Annotation tools and segmenters name a mask after its image plus a suffix: Cellpose writes
# `img_masks.tif` (its GUI `img_cp_masks.png`), and labs commonly use `img_mask.png` or `img_labels.tif`.
MASK_NAME_SUFFIX = re.compile(r"[_.\-](?:cp_)?(?:masks?|labels?)$", re.IGNORECASE)

_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the problem."""


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for `url` and the path inside it (StorageError when the
    protocol's package, such as gcsfs for gs://, is not installed)."""
    if problem := credentials_in_bucket_url(url):
        raise StorageError(problem)
    with storage_call(url):
        return url_to_fs(url, **dict(storage_options or {}))


def names_one_file(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether `url` names one file rather than a folder."""
    fs, root = filesystem(url, storage_options)
    with storage_call(url):
        return bool(fs.isfile(root))


def join_url(base: str, name: str) -> str:
    """Join a file name onto a directory URL, keeping the protocol."""
    return base.rstrip("/") + "/" + name


def image_stem(url: str) -> str:
    """File name without its last suffix (and a `.ome` before it): the image id. A plate field or
    a time point that `cellseg.formats.list_sources` lists has an id of its own (`cellseg.plates`)."""
    return image_id(url)


def mask_name_base(stem: str) -> str | None:
    """The image stem a mask stem names with a mask suffix (`img01_masks` -> `img01`), or None."""
    match = MASK_NAME_SUFFIX.search(stem)
    return stem[: match.start()] if match and match.start() > 0 else None


def masks_beside_images(urls: list[str]) -> list[str]:
    """Those of `urls` named like the mask of another of them (`img01_masks.tif` beside
    `img01.tif` in its folder, Cellpose's layout); a file named `..._label.tif` without its image is not one."""
    stems = {(posixpath.dirname(url), image_stem(url)) for url in urls}
    return [url for url in urls if (base := mask_name_base(image_stem(url))) is not None
            and (posixpath.dirname(url), base) in stems]


@dataclass(frozen=True)
class FileEntry:
    """A listed file: its URL, size in bytes and a fingerprint that changes when its content does."""

    url: str
    size: int
    fingerprint: str


def list_image_entries(url: str, storage_options: StorageOptions = None, microscopy: bool = False,
                       kind: str = "image", recursive: bool | None = None) -> list[FileEntry]:
    """Image files directly under the directory `url`, sorted by URL, or the one image file `url`
    names; with `microscopy`, also CZI/ND2/LIF files and `.zarr` folders (OME-Zarr images and
    plates: `cellseg.formats`), a `.zarr` folder named as `url` being one. Hidden files and folders (a leading dot) are skipped, those with an
    image suffix named in a warning.

    With `recursive`, the subfolders too, to MAX_LISTING_DEPTH levels below `url` (deeper ones are
    named in a warning): a `.zarr` folder is still one source, a folder holding zarr metadata (a
    results store not named .zarr) is not entered, and a folder reached a second time (a symbolic
    link back up) is listed once. Otherwise the subfolders are named in the log, with `--recursive`
    as the way to list them when `recursive` is False (segmentation sources), without when None.

    The fingerprint is the object's ETag on object storage, its modification time elsewhere.
    """
    suffixes = IMAGE_SUFFIXES + MICROSCOPY_FILE_SUFFIXES if microscopy else IMAGE_SUFFIXES
    fs, root = filesystem(url, storage_options)
    # fsspec reuses filesystem instances per process, and s3fs caches listings: without this, a
    # second listing in the same process misses new and changed objects.
    fs.invalidate_cache(root)
    with storage_call(url):  # no credentials, unreachable, timed out, denied: one StorageError naming `url`
        if not fs.isdir(root):
            if not fs.isfile(root):
                if _prefix_in_a_bucket(fs, root, url, kind):
                    logger.warning("no objects under '%s': read as an empty %s folder (an object store keeps no "
                                   "empty folders, so a prefix nothing was written under yet is one)",
                                   redact_url(url), kind)
                    return []
                named = "file" if posixpath.basename(root).lower().endswith(suffixes) else "folder"
                if fs.exists(root):  # a named pipe, socket or device: reading it could wait for ever
                    raise ValueError(f"{kind} {named} '{redact_url(url)}' is not a regular file (a pipe, socket or "
                                     "device): name a folder of images or one image file")
                raise FileNotFoundError(f"{kind} {named} '{redact_url(url)}' does not exist")
            if not posixpath.basename(root).lower().endswith(suffixes):
                raise FileNotFoundError(f"'{url}' is a file without an image suffix ({' '.join(suffixes)}): name a "
                                        "folder of images or one image file")
            info = fs.info(root)
            return [_file_entry(url, _followed_link(info) if info.get("islink") else info)]
        listing = fs.ls(root, detail=True)
        names = {posixpath.basename(item["name"].rstrip("/")) for item in listing}
        if names & {*ZARR_GROUP_KEYS, ".zarray"}:
            return [_zarr_folder_entry(fs, root, url, names, kind, microscopy)]
    walk = _Walk(suffixes, microscopy)
    walk.add(listing, url, "")
    if recursive:
        _walk_subfolders(fs, url, root, walk)
    if walk.hidden:
        logger.warning("skipping %d hidden file(s) under '%s', not images: %s", len(walk.hidden), redact_url(url),
                       _some(walk.hidden))
    if walk.special:
        logger.warning("skipping %d entry(ies) under '%s' named like images but not regular files (pipes, sockets, "
                       "devices): %s", len(walk.special), redact_url(url), _some(walk.special))
    if walk.ignored:
        logger.warning("ignoring %d file(s) under '%s' without an image suffix (%s): %s",
                       len(walk.ignored), redact_url(url), " ".join(suffixes), _some(walk.ignored))
    if walk.folders and not recursive:  # a nightly run that finds nothing must say where the images may be
        logger.log(logging.INFO if walk.entries else logging.WARNING,
                   "not searching the %d subfolder(s) of '%s' (%s): name the folder that holds the %ss%s",
                   len(walk.folders), redact_url(url), _some([name for name, _, _ in walk.folders]), kind,
                   ", or list them all with --recursive (in a job: predict.selection.recursive)" if recursive is False
                   else "")
    return sorted(walk.entries, key=lambda entry: entry.url)


MAX_LISTING_DEPTH = 16  # folder levels below a source folder that a recursive listing enters
ZARR_GROUP_KEYS = ("zarr.json", ".zgroup")  # a folder holding one is a zarr group (v3, v2): never searched
MAX_ZARR_METADATA_BYTES = 2**20  # of a zarr.json read to tell a results store from other zarr


@dataclass
class _Walk:
    """What a listing found so far: the entries, and the names (relative to the folder listed) of
    the hidden image files, the files without an image suffix and the subfolders."""

    suffixes: tuple[str, ...]
    microscopy: bool
    entries: list[FileEntry] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)  # named like images, neither files nor folders
    folders: list[tuple[str, str, dict]] = field(default_factory=list)  # (relative path, URL, listing entry)

    def add(self, listing: list[dict], url: str, prefix: str) -> None:
        """Sort one folder's listing (`url`, at `prefix` below the folder listed) into the walk."""
        for listed in sorted(listing, key=lambda item: str(item["name"])):
            name = posixpath.basename(listed["name"].rstrip("/"))
            if name.startswith("."):  # macOS's `._img01.tif` resource forks carry an image suffix but no image
                if name.lower().endswith(self.suffixes):
                    self.hidden.append(prefix + name)
                continue
            entry = _followed_link(listed) if listed.get("islink") else listed
            if self.microscopy and entry.get("type") == "directory" and name.lower().endswith(ZARR_FOLDER_SUFFIX):
                self.entries.append(FileEntry(join_url(url, name), 0, f"zarr:{entry.get('mtime') or ''}"))
                continue
            if entry.get("type") == "directory":
                self.folders.append((prefix + name, join_url(url, name), listed))
                continue
            if not name.lower().endswith(self.suffixes):
                if entry.get("type") == "file":
                    self.ignored.append(prefix + name)
                continue
            dangling = listed.get("islink") and entry is listed  # a link to nothing fails when read, naming it
            if entry.get("type") == "file" or dangling:
                self.entries.append(_file_entry(join_url(url, name), entry))
            else:
                self.special.append(prefix + name)


def _walk_subfolders(fs: fsspec.AbstractFileSystem, url: str, root: str, walk: _Walk) -> None:
    """List the subfolders `walk` found under `url` (the folder at `root`), level by level, theirs
    in turn: to MAX_LISTING_DEPTH levels, each real folder once, zarr stores not entered."""
    local = is_local(fs)
    seen = {os.path.realpath(root) if local else root.rstrip("/")}
    too_deep: list[str] = []
    revisited: list[str] = []
    stores: list[str] = []
    results: list[str] = []
    level, depth = walk.folders, 1
    while level:
        walk.folders = []
        # Real folders before links, so that a link to a folder of the same level is the one left out.
        for relative, folder_url, listed in sorted(level, key=lambda found: (bool(found[2].get("islink")), found[0])):
            path = listed["name"].rstrip("/")
            if depth > MAX_LISTING_DEPTH:
                too_deep.append(relative)
                continue
            real = os.path.realpath(path) if local else path
            if real in seen:  # a symbolic link back up (a loop) or to a folder listed already
                revisited.append(relative)
                continue
            seen.add(real)
            fs.invalidate_cache(path)
            with storage_call(folder_url):
                listing = fs.ls(path, detail=True)
            names = {posixpath.basename(item["name"].rstrip("/")) for item in listing}
            if names & set(ZARR_GROUP_KEYS):
                (results if _is_results_store(fs, path, names, folder_url) else stores).append(relative)
                continue
            walk.add(listing, folder_url, relative + "/")
        level, depth = walk.folders, depth + 1
    if too_deep:
        logger.warning("not searching %d folder(s) more than %d levels below '%s': %s", len(too_deep),
                       MAX_LISTING_DEPTH, redact_url(url), _some(too_deep))
    if revisited:
        logger.warning("not searching %d folder(s) under '%s' again, reached through a symbolic link: %s",
                       len(revisited), redact_url(url), _some(revisited))
    for relative in results:
        logger.warning("skipping '%s' in the source folder: it is a cellseg results store",
                       redact_url(join_url(url, relative)))
    if stores:
        logger.warning("not searching %d zarr store(s) under '%s' whose names do not end in .zarr: %s",
                       len(stores), redact_url(url), _some(stores))


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether `fs` is an object store (s3://, gs://, ...), whose folders are key prefixes in buckets."""
    return bool(protocols(fs) & OBJECT_STORE_PROTOCOLS)


def _is_results_store(fs: fsspec.AbstractFileSystem, path: str, names: set[str], url: str) -> bool:
    """Whether the zarr store at `path` is a cellseg results store (its zarr.json's attributes say so)."""
    if "zarr.json" not in names:
        return False
    try:
        with storage_call(url):
            data = fs.cat_file(posixpath.join(path, "zarr.json"), start=0, end=MAX_ZARR_METADATA_BYTES)
        attributes = json.loads(data).get("attributes")
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: not one
        return False
    return isinstance(attributes, dict) and "cellseg" in attributes


def _zarr_folder_entry(fs: fsspec.AbstractFileSystem, root: str, url: str, names: set[str], kind: str,
                       microscopy: bool) -> FileEntry:
    """The one image that the zarr folder `url` (at `root`, holding `names`) is, as a `.zarr`
    folder in a listing is; a results store, or a zarr folder the readers would not open, is
    refused, where listing its chunks would find nothing to do."""
    if _is_results_store(fs, root, names, url):
        raise ValueError(f"{kind} folder '{redact_url(url)}' is a cellseg results store (or one image of one), not "
                         f"{kind}s: name the folder that holds the {kind}s")
    if not microscopy:
        raise ValueError(f"{kind} folder '{redact_url(url)}' is a zarr store, not a folder of {kind} files")
    if not root.rstrip("/").lower().endswith(ZARR_FOLDER_SUFFIX):
        raise ValueError(f"{kind} folder '{redact_url(url)}' is a zarr store whose name does not end in "
                         f"{ZARR_FOLDER_SUFFIX}: name it so to read it as one image")
    return FileEntry(url, 0, f"zarr:{fs.info(root).get('mtime') or ''}")


def _prefix_in_a_bucket(fs: fsspec.AbstractFileSystem, root: str, url: str, kind: str) -> bool:
    """Whether `root`, found neither as a folder nor as a file, is a prefix in an existing bucket
    of an object store: a folder whose objects are all gone (a nightly's incoming prefix emptied)
    or not yet written. A bucket that does not exist is refused, naming it."""
    if not is_object_store(fs):
        return False
    bucket = root.strip("/").split("/", 1)[0]
    if not fs.exists(bucket):
        raise FileNotFoundError(f"{kind} folder '{redact_url(url)}': its bucket '{bucket}' does not exist")
    return bucket != root.strip("/")


def _some(names: list[str]) -> str:
    """The first five of `names` in order, and how many more."""
    return ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _file_entry(url: str, entry: dict) -> FileEntry:
    """`url`'s FileEntry from its listing entry: its size, and its ETag or modification time."""
    version = entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified") or ""
    return FileEntry(url, int(entry.get("size") or 0), f"{entry.get('size')}:{version}")


def _followed_link(entry: dict) -> dict:
    """A local symbolic link's listing entry with its target's type, size and modification time
    (fsspec lists links as type 'other'); a dangling link, or a loop, stays 'other'."""
    try:
        target = os.stat(entry["name"])
    except OSError:
        return entry
    kind = "file" if stat.S_ISREG(target.st_mode) else "directory" if stat.S_ISDIR(target.st_mode) else "other"
    return {**entry, "type": kind, "size": target.st_size, "mtime": target.st_mtime}


def list_images(url: str, storage_options: StorageOptions = None, kind: str = "image") -> list[str]:
    """Sorted URLs of the image files directly under the directory `url` (or `url`, one image file);
    `kind` names the folder in errors (image, mask, label)."""
    return [entry.url for entry in list_image_entries(url, storage_options, kind=kind)]


def read_bytes(url: str, storage_options: StorageOptions = None, max_bytes: int | None = None) -> bytes:
    """Whole file contents of `url`; a file over `max_bytes` (the limit `read_image` derives from
    max_pixels) is refused from its size on local disk, elsewhere having read no more than
    max_bytes + 1 bytes."""
    fs, path = filesystem(url, storage_options)
    try:
        with storage_call(url):
            data = fs.cat_file(path) if max_bytes is None else bounded_cat(fs, path, max_bytes)
    except FileNotFoundError as error:
        raise ImageReadError(f"'{url}': file not found") from error
    except OSError as error:  # S3 answers a ranged read of an empty object 416, "range not satisfiable"
        if max_bytes is not None and is_empty(fs, path):
            raise ImageReadError(f"'{url}': file is empty (0 bytes)") from error
        raise
    if data is None:
        raise ImageReadError(f"'{url}': file is over {max_bytes} bytes, more than an image within max_pixels "
                             "can take (raise max_pixels to allow it)")
    return data


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None) -> str:
    """Write `data` to a file at `url` (local path or any fsspec URL), creating its directory; returns `url`."""
    fs, path = filesystem(url, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)
    return url


def os_error_reason(error: OSError) -> str:
    """The system's reason an operation failed ('[Errno 13] Permission denied'), or the error's text."""
    return f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error)


def write_file_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write a local file so that readers see the old or the new contents, never a partial file."""
    with file_replaced_atomically(path) as temporary, open(temporary, "wb") as file:
        file.write(data)


PARTIAL_FILE_PREFIX = ".tmp-"  # the name of a file `file_replaced_atomically` has not finished


@contextmanager
def file_replaced_atomically(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file beside the local `path` for the block to write; put in its place, with the
    permissions a new file gets, when the block ends, and removed if it raises: readers see the
    old or the new contents, never a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=PARTIAL_FILE_PREFIX)
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def decode_image(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, warnings: list[str] | None = None
) -> np.ndarray:
    """Decode PNG/TIFF/JPEG bytes (recognised by content, not name) to a 2-D (H, W) array,
    colour converted to grayscale.

    8- and 16-bit integer and float images keep their dtype; RGB(A) and palette images become
    uint8 luma (ITU-R 601). Sizes in the file's header are checked against `max_pixels` before
    anything is decoded: the image's pixels, and its decoded bytes (pixels x samples x bytes per
    sample, and those of each tile or strip) against max_pixels x MAX_BYTES_PER_PIXEL. Raises
    ImageReadError naming `name` for anything unusable, including NaN or infinite pixels. What
    the caller should know about a usable file (only its first page used) is appended to `warnings`.
    """
    return _decoded(data, name, max_pixels, warnings, colours_apart=False).pixels


def decode_colour_image(
    data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, warnings: list[str] | None = None
) -> np.ndarray:
    """Decode as `decode_image` does, except that a colour PNG or JPEG (RGB(A), palette, CMYK,
    YCbCr) keeps its red, green and blue samples apart: (H, W, 3) uint8, for a choice of channel
    (`cellseg.formats`); a TIFF or grayscale file is (H, W) as `decode_image` gives it."""
    return _decoded(data, name, max_pixels, warnings, colours_apart=False, keep_colour=True).pixels


def read_colour_image(
    url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    warnings: list[str] | None = None,
) -> np.ndarray:
    """`read_image`, decoded by `decode_colour_image`."""
    return decode_colour_image(read_image_bytes(url, storage_options, max_pixels), url, max_pixels, warnings)


@dataclass(frozen=True)
class DecodedMask:
    """A mask or label file's pixels (H, W), and whether they are its colours, each one number."""

    pixels: np.ndarray
    colour: bool


def decode_mask(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedMask:
    """Decode a mask or label image as `decode_image` does, except for colour: an RGB(A), palette,
    CMYK or YCbCr file whose pixels are not all grey keeps each colour apart, as one unsigned
    number (red, green, blue: 8-bit samples in uint32, 16-bit ones in uint64; black is 0), since
    annotation tools save instance labels as one colour per cell, and luma would give two colours
    of equal brightness one label and more than 255 cells fewer labels than cells. Background is
    black, or in a file without black pixels the colour of over half of them (0 either way). A
    grey colour file gives its grey level, as a grayscale one does (`mask_pixels.instance_labels` judges both)."""
    return _decoded(data, name, max_pixels, None, colours_apart=True)


def float_pixel_problem(array: np.ndarray) -> str | None:
    """What makes a float image's pixels unusable (NaN or infinite ones, values beyond the float32
    range that normalisation computes in), or None; None for any other dtype."""
    if array.dtype.kind != "f":
        return None
    not_finite = array.size - int(np.count_nonzero(np.isfinite(array)))
    if not_finite:
        return f"{not_finite} of {array.size} pixels are NaN or infinite; expected finite intensities"
    largest = max(-float(array.min()), float(array.max()))
    if largest > float(np.finfo(np.float32).max):
        return (f"pixel values reach {largest:g}, beyond the float32 range (±{np.finfo(np.float32).max:g}) "
                "that cellseg computes in")
    return None


def _decoded(data: bytes, name: str, max_pixels: int, warnings: list[str] | None, colours_apart: bool,
             keep_colour: bool = False) -> DecodedMask:
    if not data:
        raise ImageReadError(f"'{name}': file is empty (0 bytes)")
    notes: list[str] = []
    found: np.ndarray | _Colours
    if data[:4] in TIFF_SIGNATURES:
        found = _decode_tiff(data, name, max_pixels, notes, colours_apart)
    else:
        plain = _decode_plain_png(data, name, max_pixels)
        found = _decode_with_pillow(data, name, max_pixels, notes, colours_apart, keep_colour) if plain is None \
            else plain
    array = found.packed if isinstance(found, _Colours) else found
    if array.ndim not in ((2, 3) if keep_colour else (2,)) or min(array.shape) < 1:
        raise ImageReadError(f"'{name}': expected a 2-D grayscale image, got shape {array.shape}")
    if problem := float_pixel_problem(array):
        raise ImageReadError(f"'{name}': {problem}")
    if warnings is not None:
        warnings.extend(notes)
    return DecodedMask(array, colour=isinstance(found, _Colours))


@dataclass(frozen=True)
class _Colours:
    """An (H, W) image's colours, each one number (`decode_mask`)."""

    packed: np.ndarray


def _colour_or_luma(rgb: np.ndarray, colours_apart: bool) -> np.ndarray | _Colours:
    """(H, W, 3) samples: their luma, or for `decode_mask` their grey level where every pixel is
    grey, else their colours packed (integer samples of 8 or 16 bits; others give luma)."""
    if not colours_apart or rgb.dtype not in (np.uint8, np.uint16):
        return _luma(rgb)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return np.ascontiguousarray(red)
    wide, bits = (np.dtype(np.uint32), 8) if rgb.dtype == np.uint8 else (np.dtype(np.uint64), 16)
    packed = np.left_shift(red.astype(wide), wide.type(2 * bits))
    packed |= np.left_shift(green.astype(wide), wide.type(bits))
    packed |= blue
    if packed.size and not (packed == 0).any():
        # No black pixel: an export on another background (white, say), which is then its most
        # common colour where that covers over half the image.
        values, counts = np.unique(packed, return_counts=True)
        if counts.max() * 2 > packed.size:
            packed[packed == values[np.argmax(counts)]] = 0
    return _Colours(packed)


def _decode_tiff(data: bytes, name: str, max_pixels: int, notes: list[str], colours_apart: bool = False,
                 ) -> np.ndarray | _Colours:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = cast(tifffile.TiffPage, tif.pages[0])  # the first page is a TiffPage, never a TiffFrame
            _check_tiff_page(page, data, name, max_pixels)
            pages = len(tif.pages)
            ome = tif.is_ome
            array = page.asarray()
    except ImageReadError:
        raise
    except Exception as error:  # tifffile raises many types on malformed input
        raise ImageReadError(f"'{name}': not a readable TIFF ({error})") from error
    if pages > 1:
        hint = "; it is an OME-TIFF: name it *.ome.tif to choose a channel, z plane or time point" if ome else \
            "; --z N segments page N, --z max their projection"
        notes.append(f"uses page 0 of {pages}: the other pages are not segmented{hint}")
    if array.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.shape[0] in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar RGB(A) is stored samples-first: (S, H, W)
    if array.ndim == 3 and array.shape[-1] == 4 and not colours_apart and array.dtype.kind == "u" and (
            transparent := _share(array[..., 3] < np.iinfo(array.dtype).max)) is not None:
        notes.append(_transparency_note(transparent))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return _colour_or_luma(array[..., :3], colours_apart)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return array


def _check_tiff_page(page: tifffile.TiffPage, data: bytes, name: str, max_pixels: int) -> None:
    """Refuse, before decoding, a TIFF page whose header asks for more memory than max_pixels
    grants, or for a sample type or compression that cellseg does not decode."""
    pixels = page.imagelength * page.imagewidth * page.imagedepth
    _check_pixel_limit(name, pixels, max_pixels)
    if pixels == 0:
        raise ImageReadError(f"'{name}': expected a 2-D grayscale image, got shape {page.shape}")
    dtype = page.dtype
    if dtype is None or dtype.kind not in "biuf":
        raise ImageReadError(f"'{name}': TIFF samples of {page.bitspersample} bits, format "
                             f"{_tiff_name(page.sampleformat)}, are not supported (expected integers or floats)")
    if page.compression not in TIFF_COMPRESSIONS:
        readable = ", ".join(dict.fromkeys(TIFF_COMPRESSIONS.values()))
        raise ImageReadError(f"'{name}': TIFF compression {_tiff_name(page.compression)} is not supported "
                             f"(cellseg reads {readable})")
    limit = max_pixels * MAX_BYTES_PER_PIXEL
    segment = prod(page.chunks) * dtype.itemsize
    for what, shape, size in (("the image", page.shape, prod(page.shape) * dtype.itemsize),
                              ("one tile or strip", page.chunks, segment)):
        if size > limit:
            raise ImageReadError(
                f"'{name}': {what} ({' x '.join(map(str, shape))} {dtype} samples) would take {size} bytes, "
                f"over the limit of {limit} (max_pixels x {MAX_BYTES_PER_PIXEL}; raise max_pixels to allow it)"
            )
    if page.compression in (*_TIFF_DEFLATE, _TIFF_PACKBITS, _TIFF_LZMA):
        view = memoryview(data)
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
            if _inflated_size(page.compression, view[offset : offset + count], segment) > segment:
                raise ImageReadError(f"'{name}': a compressed tile or strip inflates beyond the {segment} bytes "
                                     "its header declares (a decompression bomb)")


def _inflated_size(compression: int, chunk: memoryview, limit: int) -> int:
    """Bytes one compressed TIFF segment inflates to, counted no further than limit + 1, in
    memory bounded by that; 0 when it does not decode (tifffile then names the problem)."""
    if compression == _TIFF_PACKBITS:
        return _packbits_size(chunk, limit)
    if compression == _TIFF_LZMA:
        return _lzma_size(chunk, limit)
    try:
        return len(zlib.decompressobj().decompress(chunk, limit + 1))
    except zlib.error:
        return 0


def _lzma_size(chunk: memoryview, limit: int) -> int:
    """Bytes LZMA data inflates to, counted no further than limit + 1, over every stream of it:
    `lzma.decompress`, which tifffile calls, decodes streams one after another."""
    size, rest = 0, bytes(chunk)
    while rest and size <= limit:
        decompressor = lzma.LZMADecompressor()
        try:
            size += len(decompressor.decompress(rest, limit + 1 - size))
        except lzma.LZMAError:  # not (or no longer) LZMA: lzma.decompress stops here too
            break
        if not decompressor.eof:
            break
        rest = decompressor.unused_data
    return size


def _packbits_size(chunk: memoryview, limit: int) -> int:
    """Bytes a PackBits run sequence decodes to, counted no further than just past `limit`."""
    size = index = 0
    while index < len(chunk) and size <= limit:
        header = chunk[index]
        if header < 128:  # a literal run of header + 1 bytes
            size, index = size + header + 1, index + header + 2
        elif header > 128:  # one byte repeated 257 - header times
            size, index = size + 257 - header, index + 2
        else:  # 128: no operation
            index += 1
    return size


def _tiff_name(value: Any) -> str:
    """A TIFF enum value by its name (COMPRESSION.JPEGXL), or the bare number tifffile does not know."""
    return str(getattr(value, "name", value))


def _decode_plain_png(data: bytes, name: str, max_pixels: int) -> np.ndarray | None:
    """A plain 8- or 16-bit grayscale PNG decoded by `cellseg.png`, its size checked first; None
    for any other file."""
    layout = png.plain_gray(data)
    if layout is None:
        return None
    _check_pixel_limit(name, layout.height * layout.width, max_pixels)
    return png.decode_plain_gray(data, layout)


def _decode_with_pillow(data: bytes, name: str, max_pixels: int, notes: list[str], colours_apart: bool = False,
                        keep_colour: bool = False) -> np.ndarray | _Colours:
    decoded: np.ndarray | _Colours
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as opened:
            _check_pixel_limit(name, opened.width * opened.height, max_pixels)
            frames = int(getattr(opened, "n_frames", 1))
            opened.load()
            if (transparent := _transparent_share(opened)) is not None:
                notes.append(_transparency_note(transparent))
            if keep_colour and opened.mode in COLOUR_MODES:
                decoded = np.asarray(opened.convert("RGB"))
            elif colours_apart and opened.mode in COLOUR_MODES:
                decoded = _colour_or_luma(np.asarray(opened.convert("RGB")), colours_apart=True)
            else:
                to_gray = opened.mode in (*COLOUR_MODES, "LA", "1")
                decoded = np.asarray(opened.convert("L") if to_gray else opened)
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageReadError(f"'{name}': not a readable image: {_describe_content(data)}") from error
    except Exception as error:  # Pillow's plugins raise many types on malformed input
        raise ImageReadError(f"'{name}': not a readable image ({error})") from error
    if frames > 1:
        notes.append(f"uses frame 0 of {frames}: the other frames are not segmented")
    if isinstance(decoded, _Colours):
        return decoded
    array = decoded
    if array.dtype == np.int32 and array.size and array.min() >= 0 and array.max() <= 65535:
        array = array.astype(np.uint16)  # Pillow's 'I' mode for 16-bit PNGs
    return array


def _transparent_share(opened: Image.Image) -> float | None:
    """The share of an image's pixels that its alpha channel (or a palette's transparent entry) makes
    less than opaque; None when every pixel is opaque."""
    key = opened.info.get("transparency")
    try:
        if opened.mode in ("RGBA", "LA", "PA"):
            see_through = np.asarray(opened.getchannel("A")) < 255
        elif opened.mode == "P" and key is not None:
            see_through = np.asarray(opened.convert("RGBA").getchannel("A")) < 255
        elif key is not None and not isinstance(key, bytes):  # a grey level or colour that is transparent (tRNS)
            pixels = np.asarray(opened)
            see_through = (pixels == np.asarray(key)).all(axis=-1) if pixels.ndim == 3 else pixels == key
        else:
            return None
    except (ValueError, TypeError):  # a transparency entry that fits no pixel: nothing to say of it
        return None
    return _share(see_through)


def _transparency_note(share: float) -> str:
    return f"{share:.1%} of its pixels are transparent: segmented by their colour alone, the transparency ignored"


def _share(see_through: np.ndarray) -> float | None:
    """The share of pixels `see_through` marks; None when none is."""
    transparent = int(np.count_nonzero(see_through))
    return transparent / see_through.size if transparent else None


def _describe_content(data: bytes) -> str:
    """What bytes that no permitted decoder opened look like, judged by their first bytes only
    (Pillow's signature checks and a few others): nothing is parsed."""
    found = next((kind for signature, kind in _OTHER_SIGNATURES.items() if data.startswith(signature)), None)
    if found is None:
        Image.init()
        for format_id in Image.ID:
            accept = Image.OPEN[format_id][1]
            try:
                if accept is not None and accept(data[:16]):
                    found = format_id
                    break
            except Exception:  # noqa: BLE001 - a signature check that cannot judge these bytes
                continue
    if found in PILLOW_FORMATS or found == "MPO":
        return f"damaged {found} data"
    if found is not None:
        return f"its content is {found}, not {SUPPORTED_FORMATS}"
    return f"its content is not {SUPPORTED_FORMATS}"


def _check_pixel_limit(name: str, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise ImageReadError(
            f"'{name}': {pixels} pixels exceeds the limit of {max_pixels} (raise max_pixels to allow it)"
        )


COLOUR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")  # Pillow's modes of colour images


def _luma(rgb: np.ndarray) -> np.ndarray:
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = rgb.astype(np.float32) @ weights
    return np.clip(np.rint(gray), 0, np.iinfo(rgb.dtype).max if rgb.dtype.kind in "ui" else None).astype(rgb.dtype)


def read_image(
    url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    warnings: list[str] | None = None,
) -> np.ndarray:
    """Read and decode one image file into a 2-D (H, W) array (see `decode_image`), its bytes read
    by `read_image_bytes`."""
    return decode_image(read_image_bytes(url, storage_options, max_pixels), url, max_pixels, warnings)


def read_image_bytes(url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes of one image file; a file larger than its pixels within max_pixels could need is
    refused before it is read whole."""
    return read_bytes(url, storage_options, image_byte_limit(max_pixels))


def image_byte_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The most bytes an image file within `max_pixels` may hold (its pixels, and room for metadata)."""
    return max_pixels * MAX_BYTES_PER_PIXEL + MAX_EXTRA_FILE_BYTES


def check_listed_size(entry: FileEntry, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse a listed image file larger than `read_image_bytes` reads, from its listed size alone."""
    if entry.size > (limit := image_byte_limit(max_pixels)):
        raise ImageReadError(f"'{redact_url(entry.url)}': file is {entry.size} bytes, over the {limit} an image within "
                             "max_pixels can take")


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask: any value above zero is cell (masks valued 0/1 and 0/255 both work),
    except in a binary mask saved lossily (`lossy_binary`), which is cut at half its top value."""
    if lossy_binary(mask):
        return mask > mask.max() // 2
    return mask > 0


# A binary mask saved as JPEG, or resampled, keeps nearly all its pixels near its two values, and
# strays between them around every cell: above zero, they made cells about 2 pixels fatter all
# round (7% of the pixels of make synth's 256^2 masks wrong at JPEG quality 75; none cut at half).
# A label image, even saved as JPEG, has its cells' values spread over the range instead.
LOSSY_NEAR_SHARE = 0.9  # of the pixels within an eighth of the range of 0 or of the top value, at least
LOSSY_HIGH_SHARE = 0.8  # of the pixels above the lowest eighth, at least, in the top eighth
LOSSY_STRAY_LEVELS = 8  # distinct values strictly between 0 and the top value, at least (JPEG at quality 95: 14 or more)
LOSSY_TOP = 16  # a top value below this is a label or a 0/1 mask, not a compressed 0/255 one


def lossy_binary(mask: np.ndarray) -> bool:
    """Whether an 8- or 16-bit grey mask is a 0/top binary mask with a lossy format's strays
    (JPEG at quality 30-95 and bilinear resampling of 0/255 masks are; label images are not)."""
    if mask.dtype not in (np.uint8, np.uint16) or not mask.size:
        return False
    top = int(mask.max())
    if top < LOSSY_TOP:
        return False
    counts = np.bincount(mask.ravel(), minlength=top + 1)
    if np.count_nonzero(counts[1:top]) < LOSSY_STRAY_LEVELS:
        return False
    low, high = int(counts[: top // 8 + 1].sum()), int(counts[top - top // 8:].sum())
    return low + high >= LOSSY_NEAR_SHARE * mask.size and high >= LOSSY_HIGH_SHARE * (mask.size - low)


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def stacked_planes(data: bytes) -> int:
    """How many planes of its first page's size a TIFF holds (a z-stack, time series or channels
    saved as pages; thumbnails are not counted), or frames an animated PNG holds; 1 for any other file."""
    if data.startswith(png.SIGNATURE):
        # An animated PNG's frame count is in its header: Image.open decodes no pixels.
        with Image.open(io.BytesIO(data), formats=["PNG"]) as opened:
            return int(getattr(opened, "n_frames", 1))
    if data[:4] not in TIFF_SIGNATURES:
        return 1
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        first = tif.pages[0].shape
        return sum(page.shape == first for page in tif.pages)


def read_mask_file(url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   ) -> DecodedMask:
    """Read and decode one mask or label file (`decode_mask`), refused as `read_image` refuses."""
    return decode_mask(read_image_bytes(url, storage_options, max_pixels), url, max_pixels)


def read_mask(url: str, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a mask file into a boolean (H, W) array: any pixel not black is cell."""
    return binarize_mask(read_mask_file(url, storage_options, max_pixels).pixels)
