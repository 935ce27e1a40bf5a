"""Model registry: versions of checkpoints with their metrics, under a URL prefix.

Layout (local directory by default, or s3://bucket/prefix)::

    <registry>/<version>/checkpoint.pt     the checkpoint file
    <registry>/<version>/history.json      the training run's per-epoch metrics and its pictures
    <registry>/<version>/*.png             (training_curves.png, validation_gallery.png), when the
                                           run left them beside the checkpoint
    <registry>/<version>/model.json        ModelVersion metadata, including the file's sha256 and
                                           the names of the run's files kept
    <registry>/current.json                {"version": ..., "previous": [...]}: what inference uses by
                                           default, and the versions current before it (for rollback)

Versions are named `<UTC time>-<first 8 hex of sha256>`, so they sort by registration time.
Loading verifies the checkpoint's checksum before `torch.load(weights_only=True)` sees it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import wraps
from typing import Any, Concatenate, ParamSpec, TypeVar

from pydantic import BaseModel, Field, ValidationError

from cellseg import __version__
from cellseg.bounded_reads import FileTooLarge, read_at_most
from cellseg.checkpoint import MAX_CHECKPOINT_BYTES, Checkpoint, load_checkpoint_bytes, one_line, read_checkpoint_bytes
from cellseg.io import StorageOptions, filesystem, join_url
from cellseg.redact import redact, redact_text, redact_url
from cellseg.storage_errors import StorageError, storage_call

logger = logging.getLogger(__name__)

CURRENT = "current"
# What a version may be called: one path component, never '.', '..' or a path out of the registry.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
REGISTERED_NAME = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{8}(-[0-9]+)?")  # the names `register` gives (module docstring)
# What a training run leaves beside its checkpoint that the registry keeps with the version: the
# names cellseg.train (HISTORY_FILE) and cellseg.report (CURVES_FILE, GALLERY_FILE) write.
RUN_FILES = ("history.json", "training_curves.png", "validation_gallery.png")
WRITE_PROBE = ".write-check-"  # the empty file `check_writable` writes and deletes
KNOWN_SHOWN = 10  # versions named when one asked for is not found
MAX_EARLIER_CURRENT = 100  # versions current before the current one that current.json remembers for rollback
MAX_RECORD_BYTES = 16 * 2**20  # of a model.json or current.json (some KB)
MAX_RUN_FILE_BYTES = 64 * 2**20  # of a RUN_FILE (history.json, a PNG of some 100 KB)


class RegistryError(ValueError):
    """An unknown version, a missing registry or a checkpoint that fails its checksum."""


class RegistryMissing(RegistryError):
    """A registry folder that does not exist (a misspelt --registry, or none made yet)."""


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
    # The run's files kept beside checkpoint.pt (RUN_FILES that existed); versions registered
    # before cellseg kept them have none.
    files: list[str] = Field(default_factory=list)


P = ParamSpec("P")
R = TypeVar("R")


def _naming_the_registry(method: Callable[Concatenate[Registry, P], R]) -> Callable[Concatenate[Registry, P], R]:
    """`method` with the errors of the registry's storage (unreachable, timed out, no credentials,
    denied) raised as a StorageError naming the registry's URL."""

    @wraps(method)
    def call(registry: Registry, *args: P.args, **kwargs: P.kwargs) -> R:
        with storage_call(registry.url):
            return method(registry, *args, **kwargs)

    return call


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

    def file_url(self, version: str, name: str) -> str:
        """URL of `name` (checkpoint.pt, model.json or one of the version's `files`) in `version`'s folder."""
        meta = self.get(version)
        kept = ("checkpoint.pt", "model.json", *meta.files)
        if name not in kept:
            raise RegistryError(f"registry '{redact_url(self.url)}', version {meta.version} keeps no '{name}' (it keeps "
                                f"{', '.join(kept)})")
        return join_url(self.url, f"{meta.version}/{name}")

    @_naming_the_registry
    def register(self, checkpoint_url: str, storage_options: StorageOptions = None, promote: bool = False) -> ModelVersion:
        """Copy a checkpoint into the registry as a new version, with the history and pictures its
        training run left beside it (RUN_FILES); optionally make it current."""
        data = read_checkpoint_bytes(checkpoint_url, storage_options)
        checkpoint = load_checkpoint_bytes(data, checkpoint_url)  # refuses damaged and non-finite weights
        sha256 = hashlib.sha256(data).hexdigest()
        # JSON has no NaN: written as null, such a metric would leave model.json unreadable.
        metrics = {name: value for name, value in checkpoint.metrics.items() if math.isfinite(value)}
        if dropped := sorted(checkpoint.metrics.keys() - metrics.keys()):
            logger.warning("checkpoint '%s': metrics %s are not finite numbers; registered without them",
                           redact_url(checkpoint_url), ", ".join(dropped))
        run_files = _run_files(checkpoint_url, storage_options)
        registered = datetime.now(timezone.utc)
        version = f"{registered:%Y%m%d-%H%M%S}-{sha256[:8]}"
        taken = 1
        while self.fs.exists(self._path(version)):  # the same weights registered again within the second
            taken += 1
            version = f"{registered:%Y%m%d-%H%M%S}-{sha256[:8]}-{taken}"
        meta = ModelVersion(
            version=version,
            registered=registered.isoformat(timespec="microseconds"),
            checkpoint_sha256=sha256,
            checkpoint_bytes=len(data),
            epoch=checkpoint.epoch,
            metrics=metrics,
            architecture=checkpoint.model_config.model_dump(mode="json"),
            train_config=redact(checkpoint.train_config.model_dump(mode="json")),  # older checkpoints kept URLs whole
            dataset_manifest_hash=checkpoint.dataset_manifest_hash,
            cellseg_version=checkpoint.cellseg_version or __version__,
            created=checkpoint.created,
            files=list(run_files),
        )
        with self._writing():
            self.fs.makedirs(self._path(version), exist_ok=True)
            # The checkpoint and the run's files go first: model.json marks a version as registered.
            self.fs.pipe_file(self._path(version, "checkpoint.pt"), data)
            for name, content in run_files.items():
                self.fs.pipe_file(self._path(version, name), content)
            self.fs.pipe_file(self._path(version, "model.json"), meta.model_dump_json(indent=1).encode())
        if promote:
            self.promote(version)
        return meta

    def versions(self) -> list[ModelVersion]:
        """All readable registered versions, oldest first; unreadable ones are logged and left out."""
        found, unreadable = self.scan()
        for version, problem in unreadable.items():
            logger.warning("registry '%s': version %s left out: %s", redact_url(self.url), version, redact_text(problem))
        return found

    @_naming_the_registry
    def scan(self) -> tuple[list[ModelVersion], dict[str, str]]:
        """(the readable versions, oldest first; {version: why its model.json is unreadable}), so that
        one damaged version never hides the others."""
        # Listings are cached per process (s3fs); another process may have registered since.
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            self._check_bucket()
            return [], {}
        self._check_not_a_file()
        found, unreadable = [], {}
        for entry in self.fs.ls(self.root, detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            if entry.get("type") != "directory" or not self.fs.exists(self._path(name, "model.json")):
                continue
            meta = self._parse_meta(name)
            if isinstance(meta, ModelVersion):
                found.append(meta)
            else:
                unreadable[name] = meta
        # Names have one-second resolution; `registered` orders versions made within one second.
        return sorted(found, key=lambda meta: (_registered_at(meta), meta.version)), unreadable

    def _parse_meta(self, version: str) -> ModelVersion | str:
        """The model.json of `version` if it is whole and names that version, else why it is unreadable."""
        try:
            meta = ModelVersion.model_validate_json(read_at_most(self.fs, self._path(version, "model.json"),
                                                                  MAX_RECORD_BYTES, "a model.json"))
            _registered_at(meta)
        except ValidationError as error:
            return f"unreadable model.json ({one_line(error)})"
        except ValueError as error:
            return f"unreadable model.json ({error})"
        except (IsADirectoryError, FileNotFoundError) as error:  # a folder, or a prefix of objects, named model.json
            return f"unreadable model.json (not a file: {type(error).__name__})"
        if meta.version != version:
            return f"unreadable model.json (it names version {meta.version!r})"
        return meta

    def _read_meta(self, version: str) -> ModelVersion:
        meta = self._parse_meta(version)
        if not isinstance(meta, ModelVersion):
            raise RegistryError(f"registry '{redact_url(self.url)}', version {version}: {meta}")
        return meta

    BUCKET_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://")

    def _check_bucket(self) -> None:
        """A registry whose bucket does not exist is an error, not an empty registry: a misspelt
        bucket name must not read as 'train a model first'."""
        if not self.url.startswith(self.BUCKET_SCHEMES):
            return
        bucket = self.root.split("/", 1)[0]
        if bucket and bucket != self.root.rstrip("/") and not self.fs.exists(bucket):
            raise StorageError(f"'{redact_url(self.url)}': the bucket '{bucket}' does not exist")

    @_naming_the_registry
    def check_exists(self) -> None:
        """Refuse, in one line naming it, a registry folder that does not exist, so that a misspelt
        --registry is not read as an empty registry. In object storage, where an empty prefix is
        no folder, only a missing bucket is refused (`_check_bucket`)."""
        self.fs.invalidate_cache(self.root)
        if self.fs.exists(self.root):
            self._check_not_a_file()
            return
        self._check_bucket()
        if not self.url.startswith(self.BUCKET_SCHEMES):
            raise RegistryMissing(f"registry '{redact_url(self.url)}' does not exist; give the folder a registry was "
                                "made in (--registry, or the settings' registry_url)")

    def _check_not_a_file(self) -> None:
        if self.fs.isfile(self.root):
            raise RegistryError(f"registry '{redact_url(self.url)}' is a file, not a registry folder: give a folder "
                                "(new or holding versions)")

    @_naming_the_registry
    def check_writable(self) -> None:
        """Refuse, in one line, a registry that a new version could not be written into (a file, a
        folder without write permission, a read-only filesystem), before hours of training are spent
        on a model it would then refuse."""
        if self.fs.exists(self.root):
            self._check_not_a_file()
        else:
            self._check_bucket()
        probe = self._path(f"{WRITE_PROBE}{uuid.uuid4().hex}")
        with self._writing():
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Writes into the registry, whose filesystem errors (not a folder, read-only, disk full)
        are raised as one RegistryError naming it; access denied is left to storage_call."""
        try:
            yield
        except PermissionError:
            raise
        except OSError as error:
            if type(error).__module__ != "builtins":  # a storage client's own error (botocore, aiohttp)
                raise
            named = str(error.filename or "")  # the file at fault, unless it is the registry itself or the probe
            where = f": '{named}'" if named and WRITE_PROBE not in named and named.rstrip("/") != self.root else ""
            raise RegistryError(f"registry '{redact_url(self.url)}' cannot be written to ({error.strerror or error}"
                                f"{where})") from error

    @_naming_the_registry
    def current(self) -> str | None:
        """The version marked current, if any."""
        return self._current_record()[0]

    def _current_record(self) -> tuple[str | None, list[str]]:
        """(the current version, the versions current before it, most recent last) from current.json;
        one written before cellseg kept the earlier ones has none."""
        path = self._path("current.json")
        self.fs.invalidate_cache(self.root)  # a cached listing may predate another process's promote
        if not self.fs.exists(path):
            if not self.fs.exists(self.root):
                self._check_bucket()
            else:
                self._check_not_a_file()
            return None, []
        try:
            record = json.loads(read_at_most(self.fs, path, MAX_RECORD_BYTES, "a current.json"))
            version, previous = record["version"], record.get("previous", [])
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            reason = (str(error) if isinstance(error, FileTooLarge) else f"invalid JSON: {error}"
                      if isinstance(error, ValueError) else 'not {"version": NAME}')
            raise RegistryError(f"registry '{redact_url(self.url)}': current.json is unreadable ({reason}); "
                                f"promote a version to rewrite it") from error
        if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
            raise RegistryError(f"registry '{redact_url(self.url)}': current.json names {version!r}, which is not a version "
                                f"name; promote a version to rewrite it")
        earlier = [name for name in previous if isinstance(name, str) and VERSION_NAME.fullmatch(name)] \
            if isinstance(previous, list) else []
        return version, earlier

    def current_gone(self, current: str) -> str:
        """What is wrong when current.json names `current`, a version that is not in the registry."""
        return (f"registry '{redact_url(self.url)}': current.json names version {current}, which is not in it (removed?); "
                "mark a registered version current: cellseg models promote VERSION, or cellseg models rollback")

    @_naming_the_registry
    def resolve(self, version: str) -> str:
        """A concrete version name for `version` ('current' or a name); only the names of registered
        versions resolve, never a path."""
        if version == CURRENT:
            current = self.current()
            if current is None:
                self.check_exists()  # a misspelt --registry is not an empty registry
                raise RegistryError(f"registry '{redact_url(self.url)}' has no current model: train one into it (cellseg flow "
                                    "train-unet --registry ..., or with deployments prefect deployment run "
                                    "'train-unet/train-unet' ...), mark a registered version current (cellseg models "
                                    "promote VERSION), or segment with the shipped model (--model-version bundled; "
                                    '"model_version": "bundled" in a job)')
            if not self.fs.exists(self._path(current, "model.json")):
                raise RegistryError(self.current_gone(current))
            return current
        if not VERSION_NAME.fullmatch(version):
            raise RegistryError(f"'{version}' is not a version name of registry '{redact_url(self.url)}': versions are names "
                                f"such as 20250101-120000-0123abcd, never paths")
        if not self.fs.exists(self._path(version, "model.json")):
            self.check_exists()
            known = [meta.version for meta in self.versions()]
            close = difflib.get_close_matches(version, known, n=1, cutoff=0.9)
            guess = f"; did you mean {close[0]}?" if close else ""
            listed = ", ".join(known[-KNOWN_SHOWN:]) or "none"
            if len(known) > KNOWN_SHOWN:
                listed = f"the {KNOWN_SHOWN} newest of {len(known)}: {listed}; cellseg models list shows all"
            raise RegistryError(f"registry '{redact_url(self.url)}' has no version '{version}'{guess} (known: {listed})")
        return version

    @_naming_the_registry
    def get(self, version: str = CURRENT) -> ModelVersion:
        """Metadata of a version ('current' by default)."""
        return self._read_meta(self.resolve(version))

    @_naming_the_registry
    def promote(self, version: str) -> str | None:
        """Mark `version` as the one inference uses by default; only a registered version whose
        model.json is whole and whose checkpoint matches its checksum can be. Returns the version
        that was current before, which `rollback` makes current again."""
        meta = self.get(version)
        try:
            self._verified_checkpoint(meta)  # a version copied in part or damaged: the next run would fail on it
        except RegistryError as error:
            raise RegistryError(f"{error}; it cannot be made current") from error
        try:
            before, earlier = self._current_record()
        except RegistryError:  # an unreadable current.json is what promoting repairs
            before, earlier = None, []
        if before is not None and before != meta.version:
            earlier = [*earlier, before][-MAX_EARLIER_CURRENT:]
        self._write_current(meta.version, earlier)
        return before

    @_naming_the_registry
    def rollback(self) -> tuple[str, str]:
        """Make the version that was current before the last promotion current again; (the version
        current until now, the one current now). Earlier versions since deleted or damaged are passed over."""
        current, earlier = self._current_record()
        if current is None:
            raise RegistryError(f"registry '{redact_url(self.url)}' has no current model, so nothing to roll back")
        skipped = []
        while earlier:
            candidate = earlier.pop()
            if candidate == current:
                continue
            try:
                self._verified_checkpoint(self.get(candidate))
            except RegistryError as error:
                skipped.append(str(error))
                continue
            self._write_current(candidate, earlier)
            for problem in skipped:
                logger.warning("passed over on rollback: %s", redact_text(problem))
            return current, candidate
        passed = f" (passed over: {'; '.join(skipped)})" if skipped else ""
        raise RegistryError(f"registry '{redact_url(self.url)}': nothing to roll back to: no version was current before "
                            f"{current}{passed}; make one current with `cellseg models promote VERSION`")

    def _write_current(self, version: str, earlier: list[str]) -> None:
        with self._writing():
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(self._path("current.json"), json.dumps({"version": version, "previous": earlier}).encode())

    @_naming_the_registry
    def load(self, version: str = CURRENT) -> tuple[Checkpoint, ModelVersion]:
        """Load a version's checkpoint after checking it against the recorded checksum."""
        meta = self.get(version)
        data = self._verified_checkpoint(meta)
        return load_checkpoint_bytes(data, self.checkpoint_url(meta.version), file_checked=True), meta

    def _verified_checkpoint(self, meta: ModelVersion) -> bytes:
        """The bytes of `meta`'s checkpoint.pt, checked against its recorded sha256."""
        try:
            # No more than was registered: a longer file cannot match, however long it is
            data = read_at_most(self.fs, self._path(meta.version, "checkpoint.pt"),
                                min(max(meta.checkpoint_bytes, 0), MAX_CHECKPOINT_BYTES))
        except (FileNotFoundError, IsADirectoryError) as error:
            raise RegistryError(f"registry '{redact_url(self.url)}', version {meta.version}: checkpoint.pt is missing") from error
        except FileTooLarge:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != meta.checkpoint_sha256:
            size = (f" (more than the {meta.checkpoint_bytes} bytes registered)" if data is None
                    else f" ({len(data)} bytes, {meta.checkpoint_bytes} registered)" if len(data) != meta.checkpoint_bytes
                    else "")
            raise RegistryError(
                f"checkpoint of version '{meta.version}' in '{redact_url(self.url)}' does not match its recorded "
                f"sha256 {meta.checkpoint_sha256[:12]}…{size}: it was modified or corrupted"
            )
        return data


def _run_files(checkpoint_url: str, storage_options: StorageOptions) -> dict[str, bytes]:
    """{name: contents} of the RUN_FILES beside the checkpoint at `checkpoint_url` (those that exist)."""
    fs, path = filesystem(checkpoint_url, storage_options)
    folder = posixpath.dirname(path)
    found: dict[str, bytes] = {}
    with storage_call(checkpoint_url):
        for name in RUN_FILES:
            try:
                found[name] = read_at_most(fs, posixpath.join(folder, name), MAX_RUN_FILE_BYTES, f"a {name}")
            except FileNotFoundError:
                continue
    return found


def _registered_at(meta: ModelVersion) -> datetime:
    """When `meta` was registered, as an aware time (a time without zone is UTC)."""
    registered = datetime.fromisoformat(meta.registered)
    return registered if registered.tzinfo else registered.replace(tzinfo=timezone.utc)
