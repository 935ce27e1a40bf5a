"""Hostile checkpoints given to `cellseg predict --model` (issue 19): a config that sizes a huge
network, NaN weights, bytes flipped inside a weight's record of an intact zip, weights of another
network, a state_dict that is not a mapping, a folder and a missing file. Each is refused before
anything is built or written: exit status 2, one line naming the file and the problem, no
traceback, no store. A fuzz run feeds bit flips and truncations of a real checkpoint to the
loader in one subprocess under a memory limit: each loads identically or is refused cleanly.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import DIGEST_KEY, Checkpoint, content_digest, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.model import UNet
from cellseg.synth import write_dataset
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

CASES = {  # file given to --model -> what its one-line error must say besides its name
    "huge-width.pt": "base_width: Input should be less than or equal to 1024 (given 100000)",
    "wide-and-deep.pt": "at most 2048",
    "nan-weights.pt": "holds NaN or infinite values",
    "nan-weights-no-digest.pt": "holds NaN or infinite values",
    "flipped-weight-bytes.pt": "does not match the digest recorded in it",
    "other-network.pt": "size mismatch: 'stem.0.weight' is [4, 1, 3, 3], expected [8, 1, 3, 3]",
    "list-state-dict.pt": "state_dict that is not a mapping",
    "a-folder": "is a folder, not a checkpoint file",
    "missing.pt": "does not exist",
}


def _small_checkpoint() -> Checkpoint:
    """A real small checkpoint: weights after one Adam step, with the optimizer's resume state."""
    torch.manual_seed(0)
    config = ModelConfig(depth=2, base_width=4)
    model = UNet(config)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(1, 1, 32, 32)).mean().backward()
    optimizer.step()
    checkpoint = Checkpoint(config, {name: value.detach().clone() for name, value in model.state_dict().items()},
                            TrainConfig(device="cpu", max_minutes=None), {"val_dice": 0.5, "val_loss": 0.25}, epoch=1)
    checkpoint.resume_state = {"optimizer": optimizer.state_dict(), "history": [{"epoch": 1.0, "val_dice": 0.5}]}
    return checkpoint


def _write(path: Path, payload: dict, digest: bool = True) -> None:
    """Save `payload` as a checkpoint file, with a valid digest of its contents unless told not to
    (a hostile file can carry a correct digest: the other checks must not rely on it)."""
    payload = {key: value for key, value in payload.items() if key != DIGEST_KEY}
    if digest:
        payload[DIGEST_KEY] = content_digest(payload)
    torch.save(payload, path)


def _record_span(data: bytes) -> dict[str, tuple[int, int]]:
    """{zip member: (start, end) of its stored bytes} of a checkpoint file."""
    spans = {}
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
        start = info.header_offset + 30 + name_length + extra_length
        spans[info.filename] = (start, start + info.compress_size)
    return spans


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(folder of the hostile --model files, the good checkpoint they were made from)."""
    folder = tmp_path_factory.mktemp("models")
    good = folder / "good.pt"
    save_checkpoint(_small_checkpoint(), str(good))
    payload = torch.load(good, weights_only=True)

    _write(folder / "huge-width.pt", {**payload, "model_config": {**payload["model_config"], "base_width": 100000}})
    _write(folder / "wide-and-deep.pt",
           {**payload, "model_config": {**payload["model_config"], "base_width": 1024, "depth": 7}})
    nan_weights = {**payload["state_dict"], "head.bias": torch.full_like(payload["state_dict"]["head.bias"], float("nan"))}
    _write(folder / "nan-weights.pt", {**payload, "state_dict": nan_weights})
    _write(folder / "nan-weights-no-digest.pt", {**payload, "state_dict": nan_weights}, digest=False)
    _write(folder / "other-network.pt", {**payload, "model_config": {**payload["model_config"], "base_width": 8}})
    _write(folder / "list-state-dict.pt", {**payload, "state_dict": list(payload["state_dict"].values())})
    (folder / "a-folder").mkdir()

    # Bytes flipped inside the largest weight's record: the zip stays intact (torch checks no CRC).
    data = bytearray(good.read_bytes())
    start, end = max((span for name, span in _record_span(bytes(data)).items() if "/data/" in name),
                     key=lambda span: span[1] - span[0])
    for offset in range((start + end) // 2, (start + end) // 2 + 4):
        data[offset] ^= 0x5A
    (folder / "flipped-weight-bytes.pt").write_bytes(bytes(data))
    return folder, good


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_dataset(str(root), count=2, size=64, seed=4)
    return root / "images"


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def runs(models, images, tmp_path_factory):
    """{case: (completed `cellseg -q predict`, its --out)} for every hostile file and the good one,
    run at once; and the model folder's digests before and after."""
    folder, good = models
    out = tmp_path_factory.mktemp("stores")
    before = _digests(folder)

    def predict(name: str):
        store = out / f"{name}.zarr"
        return cellseg("-q", "predict", "--model", str(folder / name), "--images", str(images), "--out", str(store),
                       "--device", "cpu", check=False), store

    names = [*CASES, good.name]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(names, pool.map(predict, names), strict=True))
    return results, before, _digests(folder)


def test_the_good_checkpoint_segments(runs):
    results, _, _ = runs
    result, store = results["good.pt"]
    assert result.returncode == 0, result.stderr
    assert (store / "zarr.json").is_file()


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_checkpoint_is_one_line_naming_it_and_nothing_is_written(runs, models, name):
    results, before, after = runs
    result, store = results[name]
    folder, _ = models
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cellseg predict: error: ")
    assert f"'{folder / name}'" in lines[0] and CASES[name] in lines[0], lines[0]
    assert not store.exists()  # refused before the store is opened
    assert after == before  # the model files are read, never changed


FUZZ = r"""
import json, resource, signal, sys, time
from cellseg.checkpoint import CheckpointError, content_digest, load_checkpoint

folder, count = sys.argv[1], int(sys.argv[2])
reference = content_digest(load_checkpoint(f"{folder}/good.pt").to_dict())
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
limit = mapped + 2**30  # 1 GiB on top of what the interpreter and torch map already
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def too_slow(signum, frame):
    raise TimeoutError("over 5 s")

signal.signal(signal.SIGALRM, too_slow)
for number in range(count):
    started = time.monotonic()
    signal.alarm(5)
    try:
        loaded = load_checkpoint(f"{folder}/{number}.pt")
        outcome = "identical" if content_digest(loaded.to_dict()) == reference else "DIFFERENT"
    except CheckpointError:
        outcome = "refused"
    except BaseException as error:
        outcome = f"{type(error).__name__}: {error}"
    signal.alarm(0)
    print(json.dumps({"case": number, "outcome": outcome, "seconds": time.monotonic() - started}), flush=True)
"""


def _mutants(data: bytes, seed: int = 19) -> list[tuple[str, bytes]]:
    """(what was done, the bytes): bit flips anywhere, in the pickle, in weight records and in the
    zip's central directory; overwritten runs of bytes; extreme zip header values; truncations."""
    rng = random.Random(seed)
    spans = _record_span(data)
    pickle_span = next(span for name, span in spans.items() if name.endswith("data.pkl"))
    weights = [span for name, span in spans.items() if "/data/" in name]
    directory = data.find(b"PK\x01\x02")
    end_record = data.rfind(b"PK\x05\x06")

    def flip(offset: int) -> bytes:
        changed = bytearray(data)
        changed[offset] ^= 1 << rng.randrange(8)
        return bytes(changed)

    mutants = [(f"bit flip at {offset}", flip(offset)) for offset in rng.sample(range(len(data)), 12)]
    mutants += [(f"bit flip in data.pkl at {offset}", flip(offset)) for offset in rng.sample(range(*pickle_span), 10)]
    for _ in range(8):
        span = rng.choice(weights)
        offset = rng.randrange(*span)
        mutants.append((f"bit flip in a weight record at {offset}", flip(offset)))
    mutants += [(f"bit flip in the central directory at {offset}", flip(offset))
                for offset in rng.sample(range(directory, len(data)), 4)]
    for _ in range(3):
        offset = rng.randrange(*pickle_span)
        changed = bytearray(data)
        changed[offset: offset + 16] = rng.randbytes(16)
        mutants.append((f"16 random bytes in data.pkl at {offset}", bytes(changed)))
    for field, position in (("central directory size", 12), ("central directory offset", 16)):
        changed = bytearray(data)
        changed[end_record + position: end_record + position + 4] = b"\xff\xff\xff\xff"
        mutants.append((f"{field} 0xffffffff", bytes(changed)))
    mutants += [(f"truncated to {length} bytes", data[:length])
                for length in (0, 1, 64, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1)]
    return mutants


def test_bit_flips_and_truncations_load_identically_or_are_refused_in_bounded_time_and_memory(models, tmp_path):
    _, good = models
    mutants = _mutants(good.read_bytes())
    (tmp_path / "good.pt").write_bytes(good.read_bytes())
    for number, (_, data) in enumerate(mutants):
        (tmp_path / f"{number}.pt").write_bytes(data)

    result = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path), str(len(mutants))], capture_output=True,
                            text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stderr
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == len(mutants)
    for (what, _), outcome in zip(mutants, outcomes, strict=True):
        assert outcome["outcome"] in ("identical", "refused"), (what, outcome)
        assert outcome["seconds"] < 5, (what, outcome)
    refused = {what for (what, _), outcome in zip(mutants, outcomes, strict=True) if outcome["outcome"] == "refused"}
    # The digest catches what the zip cannot: every changed weight byte, every damaged pickle.
    assert all(what in refused for what, _ in mutants if what.startswith(("bit flip in a weight", "16 random",
                                                                           "truncated")))
