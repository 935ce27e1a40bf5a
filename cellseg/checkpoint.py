"""Checkpoint files: model weights plus everything needed to trust and reproduce them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts so that it loads with
`torch.load(..., weights_only=True)`: no pickled code runs when a file is opened.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem

from cellseg import __version__
from cellseg.config import ModelConfig, TrainConfig
from cellseg.io import StorageOptions, filesystem, write_file_atomic
from cellseg.model import UNet

FORMAT = "cellseg-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


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

    def to_dict(self) -> dict[str, Any]:
        payload = {
            "format": FORMAT,
            "model_config": self.model_config.model_dump(mode="json"),
            "state_dict": self.state_dict,
            "train_config": self.train_config.model_dump(mode="json"),
            "metrics": dict(self.metrics),
            "epoch": self.epoch,
            "dataset_manifest_hash": self.dataset_manifest_hash,
            "split_touching": self.split_touching,
            "threshold": self.threshold,
            "size_model": self.size_model,
            "cellseg_version": self.cellseg_version,
            "created": self.created,
        }
        if self.resume_state is not None:
            payload["resume_state"] = self.resume_state
        return payload


def save_checkpoint(checkpoint: Checkpoint, url: str, storage_options: StorageOptions = None) -> None:
    """Write `checkpoint` to `url` atomically (a reader never sees a half-written file)."""
    buffer = io.BytesIO()
    torch.save(checkpoint.to_dict(), buffer)
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        write_file_atomic(path, buffer.getvalue())
    else:
        fs.pipe_file(path, buffer.getvalue())


def _checkpoint_bytes(url: str, storage_options: StorageOptions = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint '{url}' does not exist") from error


def load_checkpoint(url: str, storage_options: StorageOptions = None) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint` with `weights_only=True`."""
    return load_checkpoint_bytes(_checkpoint_bytes(url, storage_options), url)


def load_checkpoint_with_digest(url: str, storage_options: StorageOptions = None) -> tuple[Checkpoint, str]:
    """`load_checkpoint` and the SHA-256 of the file's bytes, read once."""
    data = _checkpoint_bytes(url, storage_options)
    return load_checkpoint_bytes(data, url), hashlib.sha256(data).hexdigest()


def load_checkpoint_bytes(data: bytes, name: str) -> Checkpoint:
    """Parse checkpoint bytes (`name` is used in errors) with `weights_only=True`."""
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint '{name}' is corrupt or not a cellseg checkpoint ({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint '{name}' is not a {FORMAT} file")
    try:
        return Checkpoint(
            model_config=ModelConfig.model_validate(payload["model_config"]),
            state_dict=payload["state_dict"],
            train_config=TrainConfig.model_validate(payload["train_config"]),
            metrics=payload["metrics"],
            epoch=payload["epoch"],
            dataset_manifest_hash=payload.get("dataset_manifest_hash"),
            split_touching=bool(payload.get("split_touching", True)),
            threshold=float(payload.get("threshold", 0.5)),
            size_model=payload.get("size_model"),
            cellseg_version=payload["cellseg_version"],
            created=payload["created"],
            resume_state=payload.get("resume_state"),
        )
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{name}' is missing or has invalid fields ({error})") from error


def checkpoint_digest(url: str, storage_options: StorageOptions = None) -> str:
    """SHA-256 of a checkpoint file's bytes."""
    return hashlib.sha256(_checkpoint_bytes(url, storage_options)).hexdigest()
