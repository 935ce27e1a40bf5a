"""Dataset ingestion: list a source, pair images with masks, validate, copy into a local
content-addressed cache, and write a manifest.

The cache lives under one directory::

    <cache>/objects/<sha256[:2]>/<sha256>     file contents, named by their checksum
    <cache>/index.json                        source URL -> fingerprint, sha256, shape, dtype
    <cache>/manifests/<dataset hash>.json     one manifest per distinct dataset

A source file whose fingerprint (size plus ETag on object storage, size plus modification time
on local disks) matches the index is neither downloaded nor decoded again. Object names are
checksums, never source keys, so no listing can write outside the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cellseg.io import (
    FileEntry,
    StorageOptions,
    check_listed_size,
    decode_image,
    list_image_entries,
    read_image_bytes,
    write_file_atomic,
)
from cellseg.loaded_pairs import check_one_plane, check_same_size, dataset_hash
from cellseg.pairs import ImagePair, folders_not_files, pair_by_stem
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedFile:
    """One source file as held in the cache."""

    source_url: str
    bytes: int
    sha256: str
    cache_path: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class ManifestEntry:
    """An image/mask pair of the dataset."""

    id: str
    image: CachedFile
    mask: CachedFile


@dataclass(frozen=True)
class Manifest:
    """The dataset as ingested: entries sorted by id and their content hash."""

    hash: str
    images_url: str
    masks_url: str
    entries: tuple[ManifestEntry, ...]

    def pairs(self) -> list[ImagePair]:
        """Image/mask pairs pointing at the cached copies."""
        return [ImagePair(entry.id, entry.image.cache_path, entry.mask.cache_path) for entry in self.entries]

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "images_url": self.images_url,
            "masks_url": self.masks_url,
            "entries": [asdict(entry) for entry in self.entries],
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> Manifest:
        def cached(item: dict[str, Any]) -> CachedFile:
            return CachedFile(**{**item, "shape": tuple(item["shape"])})

        entries = tuple(
            ManifestEntry(item["id"], cached(item["image"]), cached(item["mask"])) for item in payload["entries"]
        )
        return cls(payload["hash"], payload["images_url"], payload["masks_url"], entries)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class IngestResult:
    """What an ingestion produced and how much it had to copy."""

    manifest: Manifest
    manifest_path: Path
    copied: int
    reused: int


class ContentCache:
    """The object store and source index under one cache directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.index_path = self.root / "index.json"
        self._lock = threading.Lock()
        self.index: dict[str, dict[str, Any]] = (
            json.loads(self.index_path.read_text()) if self.index_path.exists() else {}
        )

    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def lookup(self, entry: FileEntry) -> CachedFile | None:
        """The cached copy of an unchanged source file, or None."""
        known = self.index.get(redact_url(entry.url))
        if not known or known["fingerprint"] != entry.fingerprint:
            return None
        path = self.object_path(known["sha256"])
        if not path.exists():
            return None
        return CachedFile(redact_url(entry.url), entry.size, known["sha256"], str(path), tuple(known["shape"]), known["dtype"])

    def add(self, entry: FileEntry, data: bytes, role: str) -> CachedFile:
        """Validate (decode; one 2-D plane) and store `data`, the `role` file (image, mask); returns its
        cached description."""
        array = decode_image(data, entry.url)
        check_one_plane(role, entry.url, data)
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha256)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomic(path, data)
        with self._lock:
            # Keyed and recorded by the redacted URL: the cache keeps no credentials.
            self.index[redact_url(entry.url)] = {
                "fingerprint": entry.fingerprint,
                "sha256": sha256,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }
        return CachedFile(redact_url(entry.url), len(data), sha256, str(path), tuple(array.shape), str(array.dtype))

    def save_index(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock:
            payload = json.dumps(self.index, indent=1, sort_keys=True)
        write_file_atomic(self.index_path, payload.encode())


def ingest_dataset(
    images_url: str,
    masks_url: str,
    cache_dir: str | os.PathLike,
    storage_options: StorageOptions = None,
    max_workers: int = 8,
) -> IngestResult:
    """Pair, validate and cache a dataset; write and return its manifest.

    Pairs as `cellseg.pairs.pair_by_stem` does (mask suffixes, one folder for both; hidden files
    are not listed). Raises DatasetError (missing partners, shared stems, size mismatches, stacks) or ImageReadError
    (unreadable files), each naming the files at fault, before the manifest is written.
    """
    listed = {entry.url: entry for entry in list_image_entries(images_url, storage_options)}
    mask_entries = list_image_entries(masks_url, storage_options)
    with folders_not_files(images_url, masks_url, storage_options):
        pairs = pair_by_stem(list(listed), [entry.url for entry in mask_entries], images_url, masks_url)
    listed.update({entry.url: entry for entry in mask_entries})

    cache = ContentCache(cache_dir)

    def fetch(url: str, role: str) -> tuple[CachedFile, bool]:
        cached = cache.lookup(listed[url])
        if cached is not None:
            return cached, False
        check_listed_size(listed[url])
        return cache.add(listed[url], read_image_bytes(url, storage_options), role), True

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        fetched_images = list(pool.map(lambda pair: fetch(pair.image_url, "image"), pairs))
        fetched_masks = list(pool.map(lambda pair: fetch(pair.mask_url, "mask"), pairs))
    cache.save_index()
    copied = sum(was_copied for _, was_copied in fetched_images + fetched_masks)
    cached_images = [cached for cached, _ in fetched_images]
    cached_masks = [cached for cached, _ in fetched_masks]
    for image, mask in zip(cached_images, cached_masks, strict=True):
        check_same_size(image.source_url, image.shape, mask.source_url, mask.shape)

    manifest_entries = tuple(
        ManifestEntry(pair.id, image, mask) for pair, image, mask in zip(pairs, cached_images, cached_masks, strict=True)
    )
    digest = dataset_hash((e.id, e.image.sha256, e.mask.sha256) for e in manifest_entries)
    manifest = Manifest(digest, redact_url(images_url), redact_url(masks_url), manifest_entries)
    manifest_path = Path(cache_dir) / "manifests" / f"{digest}.json"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(manifest_path, json.dumps(manifest.to_json(), indent=1).encode())
    reused = 2 * len(pairs) - copied
    logger.info("ingested %d pairs from %s: %d files copied, %d unchanged", len(pairs), manifest.images_url, copied, reused)
    return IngestResult(manifest, manifest_path, copied, reused)
