"""Checkpoint round trips (local and S3), and refusal of unsafe, corrupt and missing files."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch

from cellseg import __version__
from cellseg.checkpoint import (
    DIGEST_KEY,
    FORMAT,
    Checkpoint,
    CheckpointError,
    content_digest,
    load_checkpoint,
    save_checkpoint,
)
from cellseg.config import ModelConfig, NormalizationConfig, TrainConfig
from cellseg.model import UNet, feature_count

MANIFEST_HASH = "ab" * 32


@pytest.fixture()
def checkpoint() -> Checkpoint:
    """A small model with non-default configs and weights that differ from a fresh init."""
    torch.manual_seed(1)
    model_config = ModelConfig(
        depth=2, base_width=4, dropout=0.2, norm="instance",
        normalization=NormalizationConfig(low_percentile=2.0, high_percentile=98.0, polarity="keep"),
    )
    model = UNet(model_config)
    with torch.no_grad():
        model.head.bias.fill_(0.75)
    return Checkpoint(
        model_config=model_config,
        state_dict=model.state_dict(),
        train_config=TrainConfig(epochs=7, learning_rate=3e-4, patch_size=64, device="cpu", max_minutes=None),
        metrics={"val_dice": 0.8125, "val_loss": 0.25},
        epoch=5,
        dataset_manifest_hash=MANIFEST_HASH,
        resume_state={"best_score": 0.8125, "epochs_without_improvement": 2},
    )


def assert_same_checkpoint(loaded: Checkpoint, original: Checkpoint) -> None:
    assert loaded.model_config == original.model_config
    assert loaded.train_config == original.train_config
    assert loaded.metrics == {"val_dice": 0.8125, "val_loss": 0.25}
    assert loaded.epoch == 5
    assert loaded.dataset_manifest_hash == MANIFEST_HASH
    assert loaded.cellseg_version == __version__
    assert loaded.created == original.created
    assert loaded.state_dict.keys() == original.state_dict.keys()
    x = torch.rand(2, 1, 21, 30)
    with torch.no_grad():
        assert torch.equal(loaded.build_model()(x), original.build_model()(x))


def test_round_trip_reproduces_everything(checkpoint, tmp_path):
    url = str(tmp_path / "nested" / "dir" / "best.pt")  # missing parents are created
    save_checkpoint(checkpoint, url)
    loaded = load_checkpoint(url)
    assert_same_checkpoint(loaded, checkpoint)
    assert loaded.resume_state == {"best_score": 0.8125, "epochs_without_improvement": 2}
    assert list(Path(url).parent.iterdir()) == [Path(url)]  # no temporary file left behind


def test_round_trip_without_optional_fields(checkpoint, tmp_path):
    checkpoint.dataset_manifest_hash = None
    checkpoint.resume_state = None
    save_checkpoint(checkpoint, str(tmp_path / "best.pt"))
    loaded = load_checkpoint(str(tmp_path / "best.pt"))
    assert loaded.dataset_manifest_hash is None
    assert loaded.resume_state is None


def test_file_is_a_plain_dict_that_loads_weights_only(checkpoint, tmp_path):
    save_checkpoint(checkpoint, str(tmp_path / "best.pt"))
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload["format"] == FORMAT
    assert payload["model_config"]["norm"] == "instance"
    assert payload["train_config"]["epochs"] == 7


def test_build_model_is_in_eval_mode(checkpoint):
    model = checkpoint.build_model()
    assert not model.training
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # dropout 0.2 is off


def test_overwriting_replaces_the_file(checkpoint, tmp_path):
    url = str(tmp_path / "best.pt")
    save_checkpoint(checkpoint, url)
    checkpoint.epoch = 6
    save_checkpoint(checkpoint, url)
    assert load_checkpoint(url).epoch == 6


class Marker:
    """Unpickling this touches a file: proof that code ran while loading."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_file_that_runs_code_when_unpickled_is_refused(checkpoint, tmp_path):
    marker = tmp_path / "code-ran"
    payload = checkpoint.to_dict()
    payload["metrics"] = {"val_dice": Marker(marker)}
    url = tmp_path / "evil.pt"
    torch.save(payload, url)

    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(str(url))
    assert not marker.exists()

    # The file really is dangerous: an unrestricted load runs the code.
    torch.load(url, weights_only=False)
    assert marker.exists()


class Extra:
    def __init__(self):
        self.value = 3


def test_file_with_a_custom_class_instance_is_refused(checkpoint, tmp_path):
    payload = checkpoint.to_dict()
    payload["extra"] = Extra()
    torch.save(payload, tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match=r"custom\.pt"):
        load_checkpoint(str(tmp_path / "custom.pt"))


def test_plain_pickle_of_code_is_refused(tmp_path):
    import warnings

    marker = tmp_path / "code-ran"
    for protocol in (2, 4):  # protocol 4 also drew torch's 2-line UserWarning before the one-line refusal
        (tmp_path / "pickled.pt").write_bytes(pickle.dumps(Marker(marker), protocol=protocol))
        with warnings.catch_warnings(record=True) as said, pytest.raises(CheckpointError, match=r"pickled\.pt"):
            warnings.simplefilter("always")
            load_checkpoint(str(tmp_path / "pickled.pt"))
        assert not [str(warning.message) for warning in said if "pickle protocol" in str(warning.message)]
    assert not marker.exists()


def test_truncated_file_is_refused_naming_it(checkpoint, tmp_path):
    buffer = io.BytesIO()
    torch.save(checkpoint.to_dict(), buffer)
    data = buffer.getvalue()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*corrupt"):
        load_checkpoint(str(tmp_path / "truncated.pt"))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", bytes(range(256)) * 4])
def test_garbage_file_is_refused_naming_it(tmp_path, content):
    (tmp_path / "garbage.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(str(tmp_path / "garbage.pt"))


def test_missing_file_is_refused_naming_it(tmp_path):
    url = str(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match=r"absent\.pt.*does not exist"):
        load_checkpoint(url)


@pytest.mark.parametrize("payload", [{"state_dict": {}}, [1, 2, 3], {"format": "other/1"}])
def test_safe_file_of_another_format_is_refused(tmp_path, payload):
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=rf"other\.pt.*not a {FORMAT}"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_missing_field_is_refused_naming_it(checkpoint, tmp_path):
    payload = checkpoint.to_dict()
    del payload["train_config"]
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial\.pt.*train_config"):
        load_checkpoint(str(tmp_path / "partial.pt"))


def test_invalid_config_is_refused(checkpoint, tmp_path):
    payload = checkpoint.to_dict()
    payload["model_config"]["depth"] = 0
    torch.save(payload, tmp_path / "invalid.pt")
    with pytest.raises(CheckpointError, match=r"invalid\.pt.*invalid fields"):
        load_checkpoint(str(tmp_path / "invalid.pt"))


@pytest.mark.integration
def test_round_trip_through_s3(checkpoint, s3_bucket):
    bucket, options = s3_bucket
    url = f"{bucket}/models/best.pt"
    save_checkpoint(checkpoint, url, options)
    assert_same_checkpoint(load_checkpoint(url, options), checkpoint)


@pytest.mark.integration
def test_missing_s3_object_is_refused(s3_bucket):
    bucket, options = s3_bucket
    with pytest.raises(CheckpointError, match=r"absent\.pt.*does not exist"):
        load_checkpoint(f"{bucket}/absent.pt", options)


def test_the_digest_covers_every_entry_not_only_the_weights(checkpoint, tmp_path):
    save_checkpoint(checkpoint, str(tmp_path / "best.pt"))
    payload = torch.load(tmp_path / "best.pt", weights_only=True)
    assert payload[DIGEST_KEY] == content_digest(payload)
    payload["threshold"] = 0.25  # a changed setting is as silent a wrong answer as a changed weight
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited\.pt.*does not match the digest"):
        load_checkpoint(str(tmp_path / "edited.pt"))


def test_a_file_without_a_digest_loads_with_a_notice(checkpoint, tmp_path, caplog):
    torch.save(checkpoint.to_dict(), tmp_path / "older.pt")  # as cellseg wrote files before the digest
    with caplog.at_level("INFO", logger="cellseg.checkpoint"):
        assert_same_checkpoint(load_checkpoint(str(tmp_path / "older.pt")), checkpoint)
    assert "older.pt' carries no digest" in caplog.text


def test_non_finite_weights_are_never_written(checkpoint, tmp_path):
    checkpoint.state_dict = {**checkpoint.state_dict, "head.bias": torch.tensor([float("inf")])}
    with pytest.raises(CheckpointError, match=r"not writing checkpoint .*best\.pt.*'head\.bias'"):
        save_checkpoint(checkpoint, str(tmp_path / "best.pt"))
    assert not (tmp_path / "best.pt").exists()


def _size_model(count: int) -> dict:
    return {"coefficients": [0.01] * count, "intercept": 3.0, "feature_mean": [0.5] * count,
            "feature_scale": [1.0] * count, "penalty": 10.0}


def test_a_size_model_reads_as_many_features_as_the_network_gives_and_round_trips(checkpoint, tmp_path):
    for config in (checkpoint.model_config, ModelConfig(depth=3, base_width=8)):
        assert feature_count(config) == UNet(config).features(torch.rand(1, 1, 40, 40)).shape[1]
    checkpoint.size_model = _size_model(feature_count(checkpoint.model_config))
    save_checkpoint(checkpoint, str(tmp_path / "sized.pt"))
    assert load_checkpoint(str(tmp_path / "sized.pt")).size_model == checkpoint.size_model


@pytest.mark.parametrize(("change", "message"), [
    (lambda size: size.update(_size_model(2 * len(size["coefficients"]))),
     r"size model for another network: it reads 112 coefficients, 112 feature_mean, 112 feature_scale, and this "
     r"network's features are 56"),
    (lambda size: size["feature_mean"].pop(), r"size model for another network: it reads 56 coefficients, 55"),
    (lambda size: size["coefficients"].__setitem__(3, float("nan")), r"invalid fields.*size_model\.coefficients"),
    (lambda size: size["feature_scale"].__setitem__(0, 0.0), r"invalid fields.*size_model\.feature_scale"),
    (lambda size: size.pop("penalty"), r"invalid fields.*size_model\.penalty"),
    (lambda size: size.update(extra=[1.0] * 10**6), r"invalid fields.*size_model\.extra"),
], ids=["another network", "lengths differ", "not finite", "zero scale", "missing entry", "unknown entry"])
def test_a_size_model_that_cannot_read_this_network_is_refused_naming_the_file(checkpoint, tmp_path, change, message):
    """Loaded as it was, such a file failed every image it predicted with a numpy broadcasting error."""
    checkpoint.size_model = _size_model(feature_count(checkpoint.model_config))
    payload = checkpoint.to_dict()
    change(payload["size_model"])
    torch.save(payload, tmp_path / "sized.pt")
    with pytest.raises(CheckpointError, match=rf"sized\.pt.*{message}"):
        load_checkpoint(str(tmp_path / "sized.pt"))
