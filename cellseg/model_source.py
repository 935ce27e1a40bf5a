"""Which model a job segments with: a checkpoint file, a version in a registry ('current' unless
told otherwise), or a model shipped in the package ('bundled' for the default one, or its name);
loaded once per worker process."""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cellseg.bundled import (
    BUNDLED_VERSION,
    SHIPPED_MODELS,
    check_shipped_digest,
    shipped_checkpoint,
    shipped_file,
    shipped_name,
)
from cellseg.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_digest,
    load_checkpoint_bytes,
    load_checkpoint_with_digest,
)
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.redact import redact_url
from cellseg.registry import CURRENT, REGISTERED_NAME, Registry, RegistryError, RegistryMissing
from cellseg.runtime import pass_precision
from cellseg.storage_errors import storage_call

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `checkpoint_url` when given, else `version` of the registry at
    `registry_url` ('current', a version name), or a shipped model ('bundled', 'nuclei', 'general')."""

    registry_url: str
    version: str = "current"  # with a checkpoint_url: its content hash once pinned
    checkpoint_url: str | None = None

    def pinned(self) -> ModelSource:
        """This source with 'current' replaced by the version it names now, so that work split over
        many tasks uses one model even if another is promoted meanwhile; a checkpoint file is
        pinned by its content hash (the version its results record), so a file rewritten since is
        loaded afresh. A missing file, registry version or bundled model fails here, before any work."""
        if self.checkpoint_url is not None:
            return ModelSource(self.registry_url, checkpoint_digest(self.checkpoint_url)[:12], self.checkpoint_url)
        if self.shipped is not None:
            shipped_checkpoint(self.shipped)
            return self
        with storage_call(self.registry_url), suggesting_a_shipped_model(self.version):
            return ModelSource(self.registry_url, Registry(self.registry_url).resolve(self.version))

    def location(self) -> str:
        """URL of the checkpoint file."""
        if self.checkpoint_url is not None:
            return self.checkpoint_url
        if self.shipped is not None:
            return str(shipped_file(self.shipped))  # its checksum is verified when it is loaded
        return Registry(self.registry_url).checkpoint_url(self.version)

    def load(self) -> tuple[Checkpoint, str]:
        """(checkpoint, the model version recorded with its results): the registry's version name
        (checksum verified), else the file's content hash, prefixed by its name for a shipped model
        (checked against its model card)."""
        if self.checkpoint_url is None and self.shipped is None:
            with storage_call(self.registry_url):
                checkpoint, meta = Registry(self.registry_url).load(self.version)
            return checkpoint, meta.version
        if self.shipped is None:
            checkpoint, digest = load_checkpoint_with_digest(self.location())
            return checkpoint, digest[:12]
        path = shipped_file(self.shipped)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        check_shipped_digest(self.shipped, digest)  # before the bytes are parsed
        return load_checkpoint_bytes(data, str(path), file_checked=True), _shipped_version(self.shipped, digest)

    def recorded_version(self) -> str:
        """The model version that results record (`load`), without loading the model; of a pinned
        source (`pinned`): a shipped model's name and content hash, not 'bundled'."""
        if self.shipped is None:
            return self.version
        return _shipped_version(self.shipped, hashlib.sha256(shipped_file(self.shipped).read_bytes()).hexdigest())

    @property
    def shipped(self) -> str | None:
        """The name of the shipped model this source names, if any."""
        return None if self.checkpoint_url is not None else shipped_name(self.version)

    def described(self) -> str:
        """This source in words, for a person: the file, the shipped model or the registry version."""
        if self.checkpoint_url is not None:
            return f"{redact_url(self.checkpoint_url)} (content {self.version})"
        if self.shipped is not None:
            return f"the shipped '{self.shipped}' model"
        return f"version {self.version} of the registry {redact_url(self.registry_url)}"


def _shipped_version(name: str, digest: str) -> str:
    """The version a shipped model's results record: its name and the start of its file's SHA-256."""
    return f"{name}-{digest[:12]}"


def load_predictor(source: ModelSource, config: PredictConfig) -> Predictor:
    """A Predictor of the model `source` names, with its version recorded."""
    checkpoint, version = source.load()
    return Predictor(checkpoint, config, version)


def shipped_predictor(name: str = BUNDLED_VERSION, config: PredictConfig | Mapping[str, Any] = PredictConfig(),
                      ) -> Predictor:
    """A Predictor of the model shipped in the package named `name` ('nuclei', 'general';
    'bundled': the default, nuclei), its checksum verified, its `model_version` the one `cellseg
    predict` records ('nuclei-<sha256 start>'); `config` as `Predictor` takes it."""
    if shipped_name(name) is None:
        raise CheckpointError(f"no shipped model named {name!r}; the package has {', '.join(SHIPPED_MODELS)} "
                              f"('{BUNDLED_VERSION}' is the default); load a checkpoint file with Predictor.from_checkpoint")
    checkpoint, version = ModelSource("", name).load()
    return Predictor(checkpoint, config, version)


_predictor_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _cached_checkpoint(source: ModelSource) -> tuple[Checkpoint, str]:
    """The checkpoint and version `source` names, read and checked once per process: predictors of
    other settings (a large image's blocks take their own thread count) share it."""
    return source.load()


@functools.lru_cache(maxsize=4)
def _cached_predictor(source: ModelSource, config_json: str) -> Predictor:
    loads = _cached_checkpoint.cache_info().misses
    checkpoint, version = _cached_checkpoint(source)
    predictor = Predictor(checkpoint, PredictConfig.model_validate_json(config_json), version)
    if _cached_checkpoint.cache_info().misses > loads:  # read now, not taken from an earlier predictor
        logger.info("loaded model %s (%s, %s)", predictor.model_version, predictor.device,
                    pass_precision(predictor.device, predictor.config.amp))
    return predictor


@contextmanager
def suggesting_a_shipped_model(version: str | None) -> Iterator[None]:
    """A RegistryError of an unknown `version` raised again with the shipped model its name looks
    like a misspelling of (`nucleus`: did you mean the shipped model 'nuclei'?), where one is, or
    where there is no registry at all, saying that `version` is no shipped model either."""
    try:
        yield
    except RegistryError as error:
        missing = isinstance(error, RegistryMissing)
        if version and (close := difflib.get_close_matches(version, [*SHIPPED_MODELS, BUNDLED_VERSION], n=1,
                                                            cutoff=0.6)):
            hint = f"did you mean the shipped model '{close[0]}'?"
        elif missing and version and version != CURRENT and not REGISTERED_NAME.fullmatch(version):
            hint = f"'{version}' is no shipped model either ({', '.join(SHIPPED_MODELS)})"
        else:
            raise
        raise (RegistryMissing if missing else RegistryError)(f"{error}; {hint}") from error


def shared_predictor(source: ModelSource, config: PredictConfig) -> Predictor:
    """One Predictor per (source, settings) per process, so each worker loads a model once."""
    with _predictor_lock:
        return _cached_predictor(source, config.model_dump_json())
