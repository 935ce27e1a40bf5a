"""Model registry: versions of checkpoints with their metrics, under a URL prefix.

Layout (local directory by default, or s3://bucket/prefix)::

    <registry>/<version>/checkpoint.pt     the checkpoint file
    <registry>/<version>/model.json        ModelVersion metadata, including the file's sha256
    <registry>/current.json                {"version": ...}: what inference uses by default

Versions are named `<UTC time>-<first 8 hex of sha256>`, so they sort by registration time.
Loading verifies the checkpoint's checksum before `torch.load(weights_only=True)` sees it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from cellseg import __version__
from cellseg.checkpoint import Checkpoint, load_checkpoint_bytes
from cellseg.io import StorageOptions, filesystem, join_url

CURRENT = "current"


class RegistryError(ValueError):
    """An unknown version, a missing registry or a checkpoint that fails its checksum."""


class ModelVersion(BaseModel):
    """Registry metadata of one checkpoint (`architecture` is its ModelConfig)."""

    version: str
    registered: str
    checkpoint_sha256: str
    checkpoint_bytes: int
    epoch: int
    metrics: dict[str, float]
    architecture: dict[str, Any]
    train_config: dict[str, Any]
    dataset_manifest_hash: str | None
    cellseg_version: str
    created: str


class Registry:
    """Register, list, promote and load model versions under `url`."""

    def __init__(self, url: str, storage_options: StorageOptions = None):
        self.url = url.rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = filesystem(self.url, storage_options)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def checkpoint_url(self, version: str) -> str:
        return join_url(self.url, f"{self.resolve(version)}/checkpoint.pt")

    def register(self, checkpoint_url: str, storage_options: StorageOptions = None, promote: bool = False) -> ModelVersion:
        """Copy a checkpoint into the registry as a new version; optionally make it current."""
        source_fs, source_path = filesystem(checkpoint_url, storage_options)
        data = source_fs.cat_file(source_path)
        checkpoint = load_checkpoint_bytes(data, checkpoint_url)
        sha256 = hashlib.sha256(data).hexdigest()
        registered = datetime.now(timezone.utc)
        version = f"{registered:%Y%m%d-%H%M%S}-{sha256[:8]}"
        meta = ModelVersion(
            version=version,
            registered=registered.isoformat(timespec="microseconds"),
            checkpoint_sha256=sha256,
            checkpoint_bytes=len(data),
            epoch=checkpoint.epoch,
            metrics=checkpoint.metrics,
            architecture=checkpoint.model_config.model_dump(mode="json"),
            train_config=checkpoint.train_config.model_dump(mode="json"),
            dataset_manifest_hash=checkpoint.dataset_manifest_hash,
            cellseg_version=checkpoint.cellseg_version or __version__,
            created=checkpoint.created,
        )
        self.fs.makedirs(self._path(version), exist_ok=True)
        # The checkpoint goes first: model.json marks a version as registered.
        self.fs.pipe_file(self._path(version, "checkpoint.pt"), data)
        self.fs.pipe_file(self._path(version, "model.json"), meta.model_dump_json(indent=1).encode())
        if promote:
            self.promote(version)
        return meta

    def versions(self) -> list[ModelVersion]:
        """All registered versions, oldest first."""
        # Listings are cached per process (s3fs); another process may have registered since.
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        found = []
        for entry in self.fs.ls(self.root, detail=True):
            if entry.get("type") != "directory":
                continue
            meta_path = posixpath.join(entry["name"], "model.json")
            if self.fs.exists(meta_path):
                found.append(ModelVersion.model_validate_json(self.fs.cat_file(meta_path)))
        # Names have one-second resolution; `registered` orders versions made within one second.
        return sorted(found, key=lambda meta: (datetime.fromisoformat(meta.registered), meta.version))

    def current(self) -> str | None:
        """The version marked current, if any."""
        path = self._path("current.json")
        self.fs.invalidate_cache(self.root)  # a cached listing may predate another process's promote
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))["version"]

    def resolve(self, version: str) -> str:
        """A concrete version name for `version` ('current' or a name)."""
        if version == CURRENT:
            current = self.current()
            if current is None:
                raise RegistryError(f"registry '{self.url}' has no current model; register one with promote")
            return current
        if not self.fs.exists(self._path(version, "model.json")):
            known = ", ".join(meta.version for meta in self.versions()) or "none"
            raise RegistryError(f"registry '{self.url}' has no version '{version}' (known: {known})")
        return version

    def get(self, version: str = CURRENT) -> ModelVersion:
        """Metadata of a version ('current' by default)."""
        return ModelVersion.model_validate_json(self.fs.cat_file(self._path(self.resolve(version), "model.json")))

    def promote(self, version: str) -> None:
        """Mark `version` as the one inference uses by default."""
        resolved = self.resolve(version)
        self.fs.makedirs(self.root, exist_ok=True)
        self.fs.pipe_file(self._path("current.json"), json.dumps({"version": resolved}).encode())

    def load(self, version: str = CURRENT) -> tuple[Checkpoint, ModelVersion]:
        """Load a version's checkpoint after checking it against the recorded checksum."""
        meta = self.get(version)
        data = self.fs.cat_file(self._path(meta.version, "checkpoint.pt"))
        if hashlib.sha256(data).hexdigest() != meta.checkpoint_sha256:
            raise RegistryError(
                f"checkpoint of version '{meta.version}' in '{self.url}' does not match its recorded "
                f"sha256 {meta.checkpoint_sha256[:12]}…: it was modified or corrupted"
            )
        return load_checkpoint_bytes(data, self.checkpoint_url(meta.version)), meta
