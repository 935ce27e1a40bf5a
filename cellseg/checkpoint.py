"""Checkpoint files: model weights plus everything needed to trust and reproduce them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts so that it loads with
`torch.load(..., weights_only=True)`: no pickled code runs when a file is opened. It carries the
SHA-256 of its own contents (`content_sha256`), checked on every load, because torch's zip
reader checks no CRC: a flipped byte in a weight would otherwise load as a silently wrong model.
Loading also refuses weights that are not finite or do not fit the network the config describes,
before any network is built.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, PositiveFloat, ValidationError

from cellseg import __version__
from cellseg.config import DEFAULT_CENTRE_PROMINENCE, ModelConfig, TrainConfig
from cellseg.io import StorageOptions, filesystem, write_file_atomic
from cellseg.model import MAX_PARAMETERS, UNet, expected_state, feature_count
from cellseg.redact import redact, redact_url
from cellseg.storage_errors import storage_error

logger = logging.getLogger(__name__)

FORMAT = "cellseg-checkpoint/1"
DIGEST_KEY = "content_sha256"  # SHA-256 of everything else in the file (`content_digest`)
# The largest file read: a last.pt of the widest network ModelConfig allows (weights and Adam's
# two moments, about 1.5 GB) fits.
MAX_CHECKPOINT_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


class SizeModelRecord(BaseModel):
    """A size model's regression as a checkpoint stores it (`cellseg.size_model.SizeModel`
    writes and reads it through this record)."""

    model_config = ConfigDict(extra="forbid")

    coefficients: list[FiniteFloat]
    intercept: FiniteFloat
    feature_mean: list[FiniteFloat]
    feature_scale: list[Annotated[PositiveFloat, Field(allow_inf_nan=False)]]
    penalty: Annotated[PositiveFloat, Field(allow_inf_nan=False)]


class _Entries(BaseModel):
    """A checkpoint file's entries besides its tensors and digest, validated on load."""

    architecture: ModelConfig = Field(alias="model_config")
    train_config: TrainConfig
    metrics: dict[str, float]
    epoch: int
    dataset_manifest_hash: str | None = None
    split_touching: bool = True
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    centre_prominence: float = Field(DEFAULT_CENTRE_PROMINENCE, gt=0.0, lt=1.0)
    size_model: SizeModelRecord | None = None
    cellseg_version: str
    created: str
    resume_state: dict[str, Any] | None = None


@dataclass
class Checkpoint:
    """What a checkpoint file holds. `resume_state` is only present in `last.pt` files."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    train_config: TrainConfig
    metrics: dict[str, float]
    epoch: int
    dataset_manifest_hash: str | None = None
    # Whether `predict` separates touching cells by default with this model (decided from the
    # validation images when training ends; PredictConfig.split_touching overrides it).
    split_touching: bool = True
    threshold: float = 0.5  # the probability threshold `predict` uses by default, decided likewise
    centre_prominence: float = DEFAULT_CENTRE_PROMINENCE  # for a model with a distance map, decided likewise
    # For a model at a cell size: the regression that reads an image's cell size off the
    # network's features (`cellseg.size_model.SizeModel.to_dict`), fitted when training ends.
    size_model: dict[str, Any] | None = None
    cellseg_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    resume_state: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # A checkpoint's model is a built network: nothing in it is left to decide.
        self.model_config = self.model_config.without_auto()

    def build_model(self) -> UNet:
        """A UNet with these weights, in eval mode, on the CPU."""
        model = UNet(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def inference_model(self, device: torch.device) -> UNet:
        """`build_model` on `device`, laid out for inference there: channels-last on CPU
        (`UNet.use_channels_last`)."""
        model = self.build_model().to(device)
        return model.use_channels_last() if device.type == "cpu" else model

    def to_dict(self) -> dict[str, Any]:
        payload = {
            "format": FORMAT,
            "model_config": self.model_config.model_dump(mode="json"),
            "state_dict": self.state_dict,
            "train_config": redact(self.train_config.model_dump(mode="json")),  # init_from may be a URL with a password
            "metrics": dict(self.metrics),
            "epoch": self.epoch,
            "dataset_manifest_hash": self.dataset_manifest_hash,
            "split_touching": self.split_touching,
            "threshold": self.threshold,
            "centre_prominence": self.centre_prominence,
            "size_model": self.size_model,
            "cellseg_version": self.cellseg_version,
            "created": self.created,
        }
        if self.resume_state is not None:
            payload["resume_state"] = self.resume_state
        return payload


def save_checkpoint(checkpoint: Checkpoint, url: str, storage_options: StorageOptions = None) -> None:
    """Write `checkpoint` to `url` atomically (a reader never sees a half-written file), with the
    digest of its contents. Weights that are not finite are refused, never written."""
    bad = non_finite_weight(checkpoint.state_dict)
    if bad is not None:
        raise CheckpointError(f"not writing checkpoint '{url}': weight '{bad}' holds NaN or infinite values")
    payload = checkpoint.to_dict()
    payload[DIGEST_KEY] = content_digest(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        write_file_atomic(path, buffer.getvalue())
    else:
        fs.pipe_file(path, buffer.getvalue())


def content_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents, all but the digest itself, in a canonical order: each
    tensor's dtype, shape and bytes, and every other value, the keys of each mapping sorted."""
    hasher = hashlib.sha256()
    _feed(hasher, {key: value for key, value in payload.items() if key != DIGEST_KEY})
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    """Add `value` to `hasher`; every item is tagged and length-prefixed, so no two contents collide."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        hasher.update(f"t{tensor.dtype}{list(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        hasher.update(f"d{len(value)}|".encode())
        for key, item in sorted(value.items(), key=lambda pair: repr(pair[0])):
            _feed(hasher, key)
            _feed(hasher, item)
    elif isinstance(value, (list, tuple)):
        hasher.update(f"l{len(value)}|".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, (str, bytes)):
        data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
        hasher.update(f"{type(value).__name__}{len(data)}|".encode() + data)
    elif isinstance(value, float):
        hasher.update(f"f{value.hex()}|".encode())
    else:  # None, bool, int and the few other types that weights_only admits
        hasher.update(f"{type(value).__name__}:{value!r}|".encode())


def non_finite_weight(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, else None."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return str(name)
    return None


def read_checkpoint_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    """The bytes of the checkpoint file at `url`, read only when it is a file of a sane size."""
    fs, path = filesystem(url, storage_options)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise CheckpointError(f"checkpoint '{url}' is a folder, not a checkpoint file (a training run's "
                                  f"folder holds best.pt and last.pt)")
        if info.get("type") != "file":
            raise CheckpointError(f"checkpoint '{url}' is not a regular file")
        size = info.get("size")
        if isinstance(size, int) and size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(f"checkpoint '{url}' is {size} bytes, more than any cellseg checkpoint "
                                  f"({MAX_CHECKPOINT_BYTES} at most)")
        with fs.open(path, "rb") as file:
            # In chunks: read(n) allocates n bytes up front, and the size given may be wrong or absent.
            chunks: list[bytes] = []
            while sum(map(len, chunks)) <= MAX_CHECKPOINT_BYTES and (chunk := file.read(1 << 24)):
                chunks.append(chunk)
            data = b"".join(chunks)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint '{url}' does not exist") from error
    except (IsADirectoryError, NotADirectoryError) as error:
        raise CheckpointError(f"checkpoint '{url}' cannot be read ({error.strerror or error})") from error
    except Exception as error:
        if translated := storage_error(url, error):  # no credentials, unreachable, timed out
            raise translated from error
        raise
    if len(data) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint '{url}' is larger than any cellseg checkpoint ({MAX_CHECKPOINT_BYTES} bytes)")
    return data


def load_checkpoint(url: str, storage_options: StorageOptions = None) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` with `weights_only=True`."""
    return load_checkpoint_bytes(read_checkpoint_bytes(url, storage_options), url)


def load_checkpoint_with_digest(url: str, storage_options: StorageOptions = None) -> tuple[Checkpoint, str]:
    """`load_checkpoint` and the SHA-256 of the file's bytes, read once."""
    data = read_checkpoint_bytes(url, storage_options)
    return load_checkpoint_bytes(data, url), hashlib.sha256(data).hexdigest()


def load_checkpoint_bytes(data: bytes, name: str, file_checked: bool = False) -> Checkpoint:
    """Parse checkpoint bytes (`name` is used in errors) with `weights_only=True`, verify the digest
    of their contents and check the weights against the model config. `file_checked`: the bytes
    already matched a recorded SHA-256 (a registry version, a shipped model's card), so a file from
    before embedded digests loads without a notice."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 in the checkpoint ...": said below, if at all
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint '{name}' is corrupt or not a cellseg checkpoint "
                              f"({_torch_reason(error)})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{name}' is not a {FORMAT} file")
    _verify_digest(payload, name, file_checked)
    try:
        entries = _Entries.model_validate(payload)
    except ValidationError as error:
        raise CheckpointError(f"checkpoint '{name}' is missing or has invalid fields ({one_line(error)})") from error
    checkpoint = Checkpoint(
        model_config=entries.architecture,
        state_dict=payload.get("state_dict"),  # type: ignore[arg-type]  # checked next
        train_config=entries.train_config,
        metrics=entries.metrics,
        epoch=entries.epoch,
        dataset_manifest_hash=entries.dataset_manifest_hash,
        split_touching=entries.split_touching,
        threshold=entries.threshold,
        centre_prominence=entries.centre_prominence,
        size_model=None if entries.size_model is None else entries.size_model.model_dump(),
        cellseg_version=entries.cellseg_version,
        created=entries.created,
        resume_state=entries.resume_state,
    )
    _check_weights(checkpoint.state_dict, checkpoint.model_config, name)
    _check_size_model(checkpoint.size_model, checkpoint.model_config, name)
    return checkpoint


_noticed: set[str] = set()  # files whose missing digest was logged already (once per process)


def _verify_digest(payload: dict[str, Any], name: str, file_checked: bool) -> None:
    recorded = payload.get(DIGEST_KEY)
    if recorded is None:
        if not file_checked and name not in _noticed:
            _noticed.add(name)
            logger.info("checkpoint '%s' carries no digest of its contents (written by an older cellseg): its "
                        "weights are checked for sanity only", redact_url(name))
        return
    try:
        actual = content_digest(payload)
    except Exception as error:  # a tensor or value the digest cannot read is a damaged file
        raise CheckpointError(f"checkpoint '{name}' is corrupt ({_torch_reason(error)})") from error
    if actual != recorded:
        raise CheckpointError(f"checkpoint '{name}' does not match the digest recorded in it (sha256 "
                              f"{str(recorded)[:12]}…, contents {actual[:12]}…): it was altered or corrupted "
                              f"after it was written")



def _check_size_model(size_model: dict[str, Any] | None, config: ModelConfig, name: str) -> None:
    """Refuse a size model that does not read this network's features: left to prediction, every
    image would fail on arrays of two lengths."""
    if size_model is None:
        return
    expected = feature_count(config)
    lengths = {key: len(size_model[key]) for key in ("coefficients", "feature_mean", "feature_scale")}
    if set(lengths.values()) != {expected}:
        raise CheckpointError(f"checkpoint '{name}' has a size model for another network: it reads "
                              f"{', '.join(f'{count} {key}' for key, count in lengths.items())}, and this "
                              f"network's features are {expected}")


def _check_weights(state_dict: Any, config: ModelConfig, name: str) -> None:
    """Refuse weights that are not the tensors of the network `config` describes, or not finite,
    before any network is built for them."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise CheckpointError(f"checkpoint '{name}' has a state_dict that is not a mapping of names to tensors "
                              f"({type(state_dict).__name__})")
    expected = expected_state(config)
    count = sum(math.prod(shape) for shape, _ in expected.values())
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"checkpoint '{name}' describes a network of {count} parameters, more than the "
                              f"{MAX_PARAMETERS} supported")
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{name}' holds the weights of another network than its model_config "
                              f"describes (missing {_some(missing)}; unexpected {_some(unexpected)})")
    for key, (shape, dtype) in expected.items():
        tensor = state_dict[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"checkpoint '{name}' holds the weights of another network than its model_config "
                                  f"describes (size mismatch: '{key}' is {list(tensor.shape)}, expected {list(shape)})")
        if tensor.layout != torch.strided or (tensor.dtype != dtype and not (tensor.is_floating_point()
                                                                            and dtype.is_floating_point)):
            raise CheckpointError(f"checkpoint '{name}': weight '{key}' is a {tensor.layout} {tensor.dtype} tensor, "
                                  f"expected {dtype}")
    bad = non_finite_weight(state_dict)
    if bad is not None:
        raise CheckpointError(f"checkpoint '{name}': weight '{bad}' holds NaN or infinite values; the model it "
                              f"came from diverged or the file is damaged")


def _some(names: set[Any], shown: int = 3) -> str:
    listed = sorted(map(repr, names))
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return (", ".join(listed[:shown]) + more) or "none"


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: each field's location and problem, and a scalar value given."""
    parts = []
    for detail in error.errors()[:3]:
        location = ".".join(str(part) for part in detail["loc"])
        value = detail.get("input")
        given = ""
        if isinstance(value, (bool, int, float, str)) and detail["type"] not in ("missing", "json_invalid"):
            shown = repr(value)
            given = f" (given {shown if len(shown) <= 40 else shown[:37] + '...'})"
        parts.append(f"{location + ': ' if location else ''}{' '.join(detail['msg'].split())}{given}")
    more = f"; and {error.error_count() - 3} more" if error.error_count() > 3 else ""
    return "; ".join(parts) + more


def _torch_reason(error: Exception) -> str:
    """The gist of an error torch raised on a bad file, in one line without torch's advice."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = "refused by the safe loader: " + text.split(" Please use", 1)[0].split("Check the documentation", 1)[0]
    text = " ".join(text.split(". This is an internal", 1)[0].split())
    return (text if len(text) <= 200 else text[:197] + "...") or type(error).__name__


def checkpoint_digest(url: str, storage_options: StorageOptions = None) -> str:
    """SHA-256 of a checkpoint file's bytes."""
    return hashlib.sha256(read_checkpoint_bytes(url, storage_options)).hexdigest()
