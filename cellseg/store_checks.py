"""What makes a results store, its target or one image's record unusable, and the errors that
name it: targets that would keep nothing or take over someone else's data, image ids that cannot
name a store entry, errors after which no write can succeed, and the descriptions of damage that
`ResultStore` reads and `cellseg verify` reports. No zarr here: plain checks of URLs, listings
and JSON documents."""

from __future__ import annotations

import errno
import json
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from fsspec.core import split_protocol
from fsspec.implementations.local import LocalFileSystem

from cellseg.bounded_reads import FileTooLarge
from cellseg.io import ZARR_GROUP_KEYS, StorageOptions, filesystem, is_object_store
from cellseg.zarr_stores import read_metadata_document

DONE = "done"  # an image's status once its arrays are all written
FAILED = "failed"  # an image's status after a run could not segment it (its record says why)


class StoreError(ValueError):
    """A store or image id that cannot be used; the message names it."""


class NoStore(StoreError):
    """No results store where one was to be read."""


class StoreWriteError(StoreError):
    """The store cannot be written at all (disk full, read-only, denied): every further write would fail too."""


WRITE_MODES = ("a", "w", "w-")  # the modes that may create the store
# OSError numbers after which no write to the store can succeed, so a run stops instead of failing each image.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM})
# Metadata of a zarr v2 hierarchy: a folder holding one is someone else's store.
ZARR_V2_KEYS = frozenset({".zgroup", ".zattrs", ".zarray", ".zmetadata"})


def unwritable(url: str, error: BaseException) -> StoreWriteError | None:
    """A StoreWriteError naming the store when `error` means that nothing more can be written to
    it (ENOSPC, EROFS, EDQUOT, EFBIG, EACCES, EPERM); None for an error of one image."""
    if not isinstance(error, OSError) or not (isinstance(error, PermissionError) or error.errno in UNWRITABLE_ERRNOS):
        return None
    reason = f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error)
    return StoreWriteError(f"cannot write to results store '{url}': {reason}")


def check_store_target(url: str, storage_options: StorageOptions = None) -> None:
    """Refuse to write a store where it would keep nothing ('', memory://) or take over what is
    there: a file, a zarr v2 store, a folder that is not empty; an existing zarr v3 group passes
    (`ResultStore.open` then checks that it is a cellseg store), as do an empty or new folder."""
    if not url.strip():
        raise StoreError("the results store URL is empty: name a new folder or an existing cellseg store")
    if split_protocol(url)[0] == "memory":
        raise StoreError(f"'{url}': memory:// keeps nothing after the run; choose a folder or an object-store URL")
    fs, path = filesystem(url, storage_options)
    path = path.rstrip("/") or path
    if fs.exists(posixpath.join(path, "zarr.json")):
        return
    if fs.isfile(path):
        raise StoreError(f"'{url}' is a file, not a results store; choose a new folder")
    names = {posixpath.basename(name.rstrip("/")) for name in fs.ls(path, detail=False)} if fs.isdir(path) else set()
    fs.invalidate_cache(path)  # object stores cache listings: the store's own writes must not meet a stale one
    names = {name for name in names if not name.endswith(".partial")}  # zarr creating the store right now
    if "zarr.json" in names:  # another run created the store between the check above and the listing
        return
    if names & ZARR_V2_KEYS:
        raise StoreError(f"'{url}' is a zarr v2 store, not a cellseg results store; choose a new folder")
    if names:
        raise StoreError(f"'{url}' is not empty and is not a cellseg results store; choose a new folder")
    if (holder := enclosing_zarr_store(fs, path)) is not None:
        raise StoreError(f"'{url}' lies inside the zarr store '{holder}': a new results store there would show as one "
                         "of its groups (in a results store, as an image); choose a folder outside it")


def check_store_creatable(url: str, storage_options: StorageOptions = None) -> None:
    """Refuse, without leaving anything behind, a store that does not exist and could not be
    created: on object storage a bucket that does not exist (or denies), on disk a folder that
    cannot be made (read-only, no permission, a file above it), tried by making it and removing
    what was made. A run with nothing to segment checks its store so, as one that writes would fail."""
    fs, path = filesystem(url, storage_options)
    if is_object_store(fs):
        bucket = path.strip("/").split("/", 1)[0]
        if bucket and not fs.exists(bucket):
            raise StoreError(f"cannot create a results store at '{url}': its bucket '{bucket}' does not exist")
        return
    if not isinstance(fs, LocalFileSystem) or os.path.isdir(path):
        return
    made, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(path)
    except OSError as error:
        raise unwritable(url, error) or StoreError(f"cannot create a results store at '{url}': {error}") from error
    finally:
        for created in made:  # the store's folder first, then those above it that were made for it
            if os.path.isdir(created):
                os.rmdir(created)


# How far up `enclosing_zarr_store` looks.
MAX_ENCLOSING_LEVELS = 64


def enclosing_zarr_store(fs: Any, path: str) -> str | None:
    """The outermost folder above `path` that is a zarr group (v3 or v2), the store a file or
    store written at `path` would land in; None when there is none."""
    store, folder, above = None, posixpath.dirname(path), path
    for _ in range(MAX_ENCLOSING_LEVELS):
        if not folder or folder == above:
            break
        try:
            if any(fs.exists(posixpath.join(folder, key)) for key in ZARR_GROUP_KEYS):
                store = folder
        except OSError:  # a level this user may not read (an object store's prefix): nothing to tell there
            pass
        folder, above = posixpath.dirname(folder), folder
    return store


# The store's own keys beside the image groups (zarr v3 metadata; v2's, which readers may look for).
RESERVED_IDS = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


# Bytes (UTF-8) an image id may take: it names a folder of the store, and file systems take 255 at
# most (so no file name's stem that was ever an id is refused now).
MAX_IMAGE_ID_BYTES = 255


def validate_image_id(image_id: str, source: str = "") -> str:
    """Image ids become zarr node names: non-empty, no '/', not '.', '..', '__'-prefixed or one of
    the store's own keys (`zarr.json.png` would name the store's metadata file), and folder names:
    at most MAX_IMAGE_ID_BYTES bytes (an image deep in subfolders has their path in its id)."""
    where = f" (from '{source}')" if source else ""
    if (size := _id_bytes(image_id)) > MAX_IMAGE_ID_BYTES:
        raise StoreError(f"image id {image_id[:40]!r}...{where} is {size} bytes, over the {MAX_IMAGE_ID_BYTES} a "
                         "store entry may take: rename the file or its folders")
    if invalid_image_id(image_id):
        raise StoreError(f"image id {image_id!r}{where} cannot name a store entry: rename the file")
    return image_id


def invalid_image_id(image_id: str) -> bool:
    """Whether `image_id` cannot name a store entry (`validate_image_id`)."""
    return (not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id or image_id.startswith("__")
            or image_id in RESERVED_IDS or _id_bytes(image_id) > MAX_IMAGE_ID_BYTES)


def _id_bytes(image_id: str) -> int:
    """The bytes an image id takes in a folder name (UTF-8; a lone surrogate of an undecodable name as 3)."""
    return len(image_id.encode("utf-8", "surrogatepass"))


class DamagedImage(StoreError):
    """An image whose metadata or arrays are unreadable, missing or incomplete; `cellseg verify
    STORE --repair` marks it not done, so that the next run segments it again."""

    def __init__(self, url: str, image_id: str, problem: str, undecodable: bool = False):
        super().__init__(f"image '{image_id}' in '{url}' is damaged: {problem}; "
                         f"{repair_hint(url, undecodable)} marks it to be segmented again")
        self.url, self.image_id, self.problem, self.undecodable = url, image_id, problem, undecodable

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a Dask worker, it reaches the flow whole
        return (type(self), (self.url, self.image_id, self.problem, self.undecodable))


class DamagedStore(StoreError):
    """The store's own metadata (its root zarr.json) cannot be read."""


def repair_hint(url: str, read_data: bool = False) -> str:
    """The command that marks a store's damaged images to be segmented again (`read_data`: also
    those whose chunks cannot be decoded, which only reading them shows)."""
    return f"`cellseg verify {url}{' --read-data' if read_data else ''} --repair`"


def damage_summary(url: str, damaged: Mapping[str, str], shown: int = 5) -> str:
    """One line naming the damaged images of a store (the first `shown` with their problems) and
    how to repair them."""
    items = sorted(damaged.items())
    named = "; ".join(f"'{image_id}': {problem}" for image_id, problem in items[:shown])
    more = f"; and {len(items) - shown} more" if len(items) > shown else ""
    count = f"{len(items)} image{'s' if len(items) != 1 else ''}"
    # --read-data: the damage a read finds may be a chunk that cannot be decoded, which only it sees.
    return (f"{count} in '{url}' {'are' if len(items) != 1 else 'is'} damaged ({named}{more}); "
            f"{repair_hint(url, read_data=True)} marks {'them' if len(items) != 1 else 'it'} to be segmented again by the next predict")


def describe(error: BaseException) -> str:
    """An exception as one line: its type and message."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def record_problem(record: Any) -> str | None:
    """Why an image's cellseg attributes cannot be used (None when they can): a JSON object whose
    done form has a [H, W] shape and statistics, model and arrays of the right JSON types."""
    if not isinstance(record, dict):
        return f"its 'cellseg' attribute is {type(record).__name__}, not a JSON object"
    if record.get("status") != DONE:
        return None
    shape = record.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(side, int) and side > 0 for side in shape)):
        return f"its shape {shape!r} is not [height, width]"
    for key, kind in (("statistics", dict), ("model", dict), ("arrays", list)):
        if key in record and not isinstance(record[key], kind):
            return f"its {key!r} is {type(record[key]).__name__}, not a JSON {'object' if kind is dict else 'array'}"
    if "statistics" not in record:
        return "it is marked done but has no statistics"
    if not all(isinstance(path, str) for path in record.get("arrays", ())):
        return f"its 'arrays' {record['arrays']!r} are not all paths"
    return None


def _group_document_problem(data: bytes) -> str | None:
    """Why `data` is not a zarr v3 group's zarr.json (None when it is one, or an array's)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        return f"not valid JSON: {describe(error)}"
    if not isinstance(document, dict) or document.get("zarr_format") != 3 or document.get("node_type") not in ("group", "array"):
        return "not zarr v3 metadata"
    if not isinstance(document.get("attributes", {}), dict):
        return "its attributes are not a JSON object"
    return None


def store_metadata_problem(url: str, storage_options: StorageOptions = None) -> str | None:
    """Why the store's own zarr.json at `url` cannot be read (None when it can, or there is none)."""
    fs, path = filesystem(url, storage_options)
    try:
        return _group_document_problem(read_metadata_document(fs, posixpath.join(path, "zarr.json")))
    except FileNotFoundError:
        return None
    except FileTooLarge as error:
        return str(error)


