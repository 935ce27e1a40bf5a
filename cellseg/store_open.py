"""Opening a results store: its root group at a URL, refused when it is no cellseg store of this
layout or a target that would lose data, and its root metadata rewritten when unreadable."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import zarr
from fsspec.core import split_protocol, strip_protocol
from fsspec.implementations.local import LocalFileSystem
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg import __version__
from cellseg.io import StorageOptions, filesystem
from cellseg.redact import credentials_in_bucket_url, redact_url
from cellseg.storage_errors import StorageError, credentials_refused, storage_error, unexplained_denial
from cellseg.store_checks import (
    WRITE_MODES,
    DamagedStore,
    NoStore,
    StoreError,
    check_store_target,
    repair_hint,
    store_metadata_problem,
    unwritable,
)
from cellseg.store_layout import LAYOUT_VERSION, METADATA_ERRORS, StoreMode, now
from cellseg.zarr_stores import bounded_store, read_metadata_document


def open_root(url: str, mode: StoreMode, storage_options: StorageOptions) -> zarr.Group:
    """The root group of the store at `url` (a URL or a local path), created when `mode` allows it;
    refuses groups that are not cellseg stores and, for writing, targets where a store would keep
    nothing or take over other data (`check_store_target`)."""
    if problem := credentials_in_bucket_url(url):
        raise StorageError(problem)
    location = _zarr_location(url)
    # zarr refuses fsspec options beside a local path.
    options = _zarr_storage_options(url, storage_options) if location == url else None
    # A new store gets its cellseg attributes in the same write as its group: a store that is
    # being created is never seen without them, so a group without them is never ours.
    attributes: dict[str, Any] = {"cellseg": {"layout": LAYOUT_VERSION, "created": now(), "cellseg_version": __version__}}
    try:
        if mode in WRITE_MODES:
            check_store_target(url, storage_options)
        try:
            store = bounded_store(location, mode, options)
            root = zarr.open_group(store, mode=mode, zarr_format=3, attributes=attributes)
        except ContainsGroupError:
            # Another run created the store between zarr's check and its create: open that one.
            root = zarr.open_group(store, mode=mode, zarr_format=3)
    except FileNotFoundError as error:
        if translated := storage_error(url, error):  # a missing bucket
            raise translated from error
        if mode in WRITE_MODES:  # a folder above it that cannot be made (/proc/x.zarr)
            raise StoreError(f"cannot create a results store at '{redact_url(url)}': {error}") from error
        raise NoStore(f"no results store at '{redact_url(url)}'") from error
    except PermissionError as error:
        if refused := credentials_refused(url, error):
            raise refused from error
        raise StorageError(f"access denied opening the results store '{redact_url(url)}': {error}"
                           f"{unexplained_denial(error)}") from error
    except OSError as error:
        if translated := storage_error(url, error):  # timed out, connection refused
            raise translated from error
        if mode not in WRITE_MODES:
            if isinstance(error, (NotADirectoryError, FileExistsError)):  # r+ on a file: zarr tries to make it a folder
                raise NoStore(f"no results store at '{redact_url(url)}': it is a file") from error
            raise
        if cannot_write := unwritable(url, error):
            raise cannot_write from error
        if isinstance(error, (NotADirectoryError, FileExistsError, IsADirectoryError)):
            raise StoreError(f"cannot create a results store at '{redact_url(url)}': {error}") from error
        raise
    except (StoreError, StorageError):
        raise
    except ContainsArrayError as error:
        raise StoreError(f"'{redact_url(url)}' is a zarr array, not a results store: give the store's folder, "
                         "the one holding the image groups") from error
    except METADATA_ERRORS as error:
        if translated := storage_error(url, error):  # a storage option the filesystem refuses (a TypeError)
            raise translated from error
        if problem := store_metadata_problem(url, storage_options):
            advice = (f"{repair_hint(url)} rewrites it" if repairable(url, storage_options) else
                      "no image group under it is a cellseg result, so there is nothing to repair it from")
            raise DamagedStore(f"the results store's own metadata '{redact_url(url)}/zarr.json' cannot be read ({problem}); "
                               f"{advice}") from error
        raise
    except Exception as error:
        if translated := storage_error(url, error):  # botocore's: no credentials, unreachable, timed out
            raise translated from error
        raise
    _check_store_attributes(url, root.attrs.get("cellseg"), writing=mode != "r")
    return root


def repair_store_metadata(url: str, storage_options: StorageOptions = None) -> None:
    """Write fresh cellseg root metadata over an unreadable root zarr.json, once an image group
    under it shows that it is a cellseg store; StoreError (nothing written) otherwise."""
    if not _holds_a_cellseg_image(url, storage_options):
        shown_url = redact_url(url)
        raise StoreError(f"'{shown_url}/zarr.json' cannot be read and no image group under '{shown_url}' is a cellseg "
                         "result: not a results store, left as it is")
    meta = {"layout": LAYOUT_VERSION, "created": None, "cellseg_version": __version__, "repaired": now()}
    document = {"zarr_format": 3, "node_type": "group", "attributes": {"cellseg": meta}}
    fs, path = filesystem(url, storage_options)
    fs.pipe_file(posixpath.join(path, "zarr.json"), json.dumps(document, indent=2).encode())


def repairable(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether `repair_store_metadata` could rewrite the unreadable root metadata of the store at
    `url`; True where the store cannot be listed to tell (the advice stays the usual one)."""
    try:
        return _holds_a_cellseg_image(url, storage_options)
    except Exception:  # noqa: BLE001 - a listing denied or timed out: the open's own error is the one to give
        return True


def _holds_a_cellseg_image(url: str, storage_options: StorageOptions) -> bool:
    """Whether a group directly under the store at `url` is a cellseg image: what shows that a
    store whose own zarr.json cannot be read is a results store."""
    fs, path = filesystem(url, storage_options)
    for child in sorted(fs.ls(path, detail=False)):
        try:
            document = json.loads(read_metadata_document(fs, posixpath.join(child, "zarr.json")))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, RecursionError):
            continue
        attributes = document.get("attributes") if isinstance(document, dict) else None
        if isinstance(attributes, dict) and isinstance(attributes.get("cellseg"), dict):
            return True
    return False


def _zarr_location(url: str) -> str:
    """Where zarr opens the store at `url`: a file:// URL as its local path, so that it gets
    zarr's LocalStore as a plain path does (its fsspec store makes no folders on the local disk)."""
    return strip_protocol(url) if split_protocol(url)[0] in LocalFileSystem.protocol else url


def _zarr_storage_options(url: str, storage_options: StorageOptions) -> dict[str, Any] | None:
    """fsspec options of the store's own filesystem. On s3://, each object is read in one request:
    s3fs would otherwise ask every object's size first (to split large ones), a second request
    for each zarr.json and chunk, and for a missing one a listing as well."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        options.setdefault("max_concurrency", 1)
    return options or None


def _check_store_attributes(url: str, meta: Any, writing: bool) -> None:
    """Refuse a group whose cellseg attributes (`meta`) are not those of a store of this layout,
    naming what it is instead: no cellseg group, one image's group of a store, another layout."""
    shown_url = redact_url(url)
    if not isinstance(meta, dict):
        advice = "choose a new folder" if writing else "give a store that cellseg predict wrote"
        raise StoreError(f"'{shown_url}' is a zarr group but not a cellseg results store; {advice}")
    if "layout" not in meta and "status" in meta:
        # `results.zarr/<image id>` is what napari and ome-zarr open, so it is an easy slip here.
        store_url = shown_url.rstrip("/").rsplit("/", 1)[0]
        raise StoreError(f"'{shown_url}' is one image of a results store, not a store: give the store, '{store_url}'")
    if meta.get("layout") != LAYOUT_VERSION:
        raise StoreError(f"store '{shown_url}' has layout {meta.get('layout')}, this cellseg reads {LAYOUT_VERSION}")
