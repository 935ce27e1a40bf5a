"""Hostile settings: a few hundred seeded, generated settings files (YAML and TOML: truncations,
bit flips, deep nesting, alias and merge-key bombs, huge numbers, wrong types, huge strings,
foreign YAML tags, garbage) and CELLSEG_* JSON values, each loaded by `load_settings` in one
subprocess limited to 1 GiB of address space. Each is loaded or refused with SettingsError,
within 5 s; an alias bomb in --config is refused by the command at once, naming the file."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

SEED = 19
CASES = 360
MEMORY_LIMIT = 1 << 30
SECONDS_PER_INPUT = 5.0
BOMB_SECONDS = 1.0  # "in well under a second"
SECRET = "fuzz-secret-value"

BASE = {
    "registry_url": "runs/registry",
    "storage_timeouts": {"connect_seconds": 5, "read_seconds": 20, "attempts": 3},
    "model": {"depth": 3, "base_width": 8, "dropout": 0.1},
    "training": {"epochs": 3, "learning_rate": 0.001, "patience": 5, "device": "cpu"},
    "predict": {"threshold": 0.4, "tile_size": 256, "batch_size": 2},
    "storage": {"s3": {"endpoint_url": "http://127.0.0.1:9", "anon": False, "secret": SECRET,
                       "config_kwargs": {"read_timeout": 5}}},
}
BASE_TOML = """registry_url = "runs/registry"
[storage_timeouts]
connect_seconds = 5
read_seconds = 20
attempts = 3
[model]
depth = 3
base_width = 8
dropout = 0.1
[training]
epochs = 3
learning_rate = 0.001
patience = 5
device = "cpu"
[predict]
threshold = 0.4
tile_size = 256
batch_size = 2
[storage.s3]
endpoint_url = "http://127.0.0.1:9"
anon = false
secret = "fuzz-secret-value"
config_kwargs = { read_timeout = 5 }
"""
NUMERIC = [("training", "epochs"), ("training", "learning_rate"), ("predict", "threshold"), ("predict", "tile_size"),
           ("model", "depth"), ("model", "base_width"), ("storage_timeouts", "read_seconds"), ("storage_timeouts", "attempts")]


# The generator: (kind, suffix, file bytes, environment) for each case. -----------------------------


def _yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def _set(data: dict, section: str, key: str, value: Any) -> dict:
    copy = json.loads(json.dumps(data))
    copy.setdefault(section, {})[key] = value
    return copy


def alias_bomb(width: int, depth: int) -> str:
    """A YAML "billion laughs": a few hundred bytes that expand to width ** depth values."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "storage:\n  s3:\n" + "".join(f"    {line}\n" for line in lines)


def merge_bomb(rng: random.Random) -> str:
    width, depth = rng.randint(4, 9), rng.randint(4, 9)
    lines = ["m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(width)) + "}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * width)}], own{i}: 1}}" for i in range(1, depth)]
    return "storage:\n  s3:\n" + "".join(f"    {line}\n" for line in lines)


def deep_yaml(rng: random.Random) -> str:
    depth = rng.choice([33, 40, 200, 1000, 5000, 20000])
    style = rng.choice(["flow list", "flow map", "block"])
    if style == "flow list":
        return "storage: {s3: {x: " + "[" * depth + "]" * depth + "}}"
    if style == "flow map":
        return "storage: {s3: " + "{a: " * depth + "1" + "}" * depth + "}"
    depth = min(depth, 300)  # indentation grows quadratically
    return "storage:\n" + "".join("  " * (level + 1) + f"k{level}:\n" for level in range(depth)) + "  " * (depth + 1) + "v"


def deep_toml(rng: random.Random) -> str:
    depth = rng.choice([33, 40, 200, 1000, 5000, 15000])
    style = rng.choice(["arrays", "inline tables", "dotted keys", "table header"])
    if style == "arrays":
        return "[storage.s3]\nx = " + "[" * depth + "]" * depth + "\n"
    if style == "inline tables":
        return "[storage]\ns3 = " + "{ a = " * depth + "1" + " }" * depth + "\n"
    depth = min(depth, 3000)
    path = ".".join(f"k{level}" for level in range(depth))
    return f"[storage.s3]\n{path} = 1\n" if style == "dotted keys" else f"[storage.s3.{path}]\nv = 1\n"


def huge_number(rng: random.Random, toml: bool) -> str:
    section, key = rng.choice(NUMERIC)
    digits = rng.choice([20, 400, 4301, 5000, 30000])
    value = rng.choice(["9" * digits, "-" + "9" * digits, f"1e{digits}", f"-1e{digits}", "0." + "0" * digits + "1",
                        "inf" if toml else ".inf", "nan" if toml else ".nan", "1_000" if toml else "0x7fffffff"])
    return f"[{section}]\n{key} = {value}\n" if toml else f"{section}:\n  {key}: {value}\n"


def wrong_type(rng: random.Random) -> dict:
    section = rng.choice(["registry_url", "storage_timeouts", "model", "training", "predict", "storage"])
    value = rng.choice([None, True, 0, -1, 2**70, 3.5, "text", "", [], [1, "a", None], {}, {"x": {"y": [1]}},
                        "x" * rng.randint(1000, 20000), ["a"] * 200])
    if section == "registry_url" or rng.random() < 0.3:
        return {**BASE, section: value}
    key = rng.choice([*BASE.get(section, {"s3": 0}).keys(), "unknown_field", "s3"])
    return _set(BASE, section, key, value)


def tagged_yaml(rng: random.Random) -> str:
    return rng.choice([
        "training: !!python/object/apply:os.system ['echo hacked']\n",
        "training: !!python/name:os.system\n",
        "registry_url: !!binary aGVsbG8=\n",
        "storage: {s3: {x: !!set {a, b}}}\n",
        "storage: {s3: {when: 2024-01-01T10:00:00}}\n",
        "registry_url: 2024-02-30\n",
        "storage: !!omap [{s3: {}}]\n",
        "storage: {s3: !!pairs [{a: 1}, {a: 2}]}\n",
        "training: !custom {epochs: 1}\n",
        "? [complex, key]\n: 1\n",
        "yes: no\non: off\n",
        "1: one\n",
        "storage: {s3: {1.5: x}}\n",
        "training:\n  epochs: 1\ntraining:\n  epochs: 2\n",
        "\ufefftraining: {epochs: 2}\n",
        "training: {epochs: 2}\r\n\x00\n",
        "--- \ntraining: {epochs: 1}\n--- \ntraining: {epochs: 2}\n",
        "%YAML 1.1\n%TAG ! tag:example.com,2000:\n---\ntraining: !foo {epochs: 1}\n",
        "&a [*a]\n",
        "storage: {s3: &a {x: *a}}\n",
    ])


def generate(seed: int, count: int) -> Iterator[tuple[str, str, bytes, dict[str, str]]]:
    """`count` hostile cases, the same for a given seed: (kind, suffix, file bytes, environment)."""
    rng = random.Random(seed)
    base_yaml, base_toml = _yaml(BASE).encode(), BASE_TOML.encode()
    makers: list[tuple[str, Callable[[], tuple[str, bytes, dict[str, str]]]]] = [
        ("valid", lambda: (rng.choice([".yaml", ".toml"]), b"", {})),
        ("truncated yaml", lambda: (".yaml", base_yaml[: rng.randrange(len(base_yaml))], {})),
        ("truncated toml", lambda: (".toml", base_toml[: rng.randrange(len(base_toml))], {})),
        ("bit flips yaml", lambda: (".yaml", _flipped(rng, base_yaml), {})),
        ("bit flips toml", lambda: (".toml", _flipped(rng, base_toml), {})),
        ("deep yaml", lambda: (".yaml", deep_yaml(rng).encode(), {})),
        ("deep toml", lambda: (".toml", deep_toml(rng).encode(), {})),
        ("alias bomb", lambda: (".yaml", alias_bomb(rng.randint(6, 12), rng.randint(6, 10)).encode(), {})),
        ("merge-key bomb", lambda: (".yaml", merge_bomb(rng).encode(), {})),
        ("huge number yaml", lambda: (".yaml", huge_number(rng, toml=False).encode(), {})),
        ("huge number toml", lambda: (".toml", huge_number(rng, toml=True).encode(), {})),
        ("wrong type", lambda: (".yaml", _yaml(wrong_type(rng)).encode(), {})),
        ("huge string", lambda: (".yaml", _yaml({**BASE, "registry_url": "s3://b/" + "x" * rng.choice(
            [1000, 30000, 60000, 70000])}).encode(), {})),
        ("many values", lambda: (".yaml", ("storage: {s3: {x: [" + ",".join(["1"] * rng.choice([100, 9000, 12000]))
                                           + "]}}").encode(), {})),
        ("garbage", lambda: (rng.choice([".yaml", ".toml"]), rng.randbytes(rng.randint(0, 4000)), {})),
        ("yaml tags", lambda: (".yaml", tagged_yaml(rng).encode(), {})),
        ("not a mapping", lambda: (rng.choice([".yaml", ".toml"]), rng.choice([b"- 1\n- 2\n", b"42\n", b"'x'\n", b"",
                                                                               b"~\n", b"a = 1\n[a]\n"]), {})),
        ("environment json", lambda: (".yaml", base_yaml, {"CELLSEG_STORAGE__S3": _hostile_json(rng)})),
    ]
    for number in range(count):
        kind, make = makers[number % len(makers)]
        suffix, data, env = make()
        if kind == "valid":
            data = base_yaml if suffix == ".yaml" else base_toml
        yield kind, suffix, data, env


def _flipped(rng: random.Random, data: bytes) -> bytes:
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def _hostile_json(rng: random.Random) -> str:
    depth = rng.choice([40, 5000, 30000])
    return rng.choice([
        "[" * depth + "]" * depth,
        '{"a": ' * depth + "1" + "}" * depth,
        '{"endpoint_url": "http://x", "n": ' + "9" * 5000 + "}",
        '{"x": [' + ",".join(["1"] * 12000) + "]}",
        '{"secret": "abc"',  # malformed
        '{"x": "' + "y" * 70000 + '"}',
        '{"anon": "false", "key": "k"}',
    ])


# The subprocess: load every case, time it, report anything but "loaded" or SettingsError. ---------


def run_cases() -> None:
    """In a subprocess limited by RLIMIT_AS: load each generated case; print a JSON report."""
    from cellseg.settings import SettingsError, load_settings

    def alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"over {SECONDS_PER_INPUT} s")

    signal.signal(signal.SIGALRM, alarm)
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    base_environment = dict(os.environ)
    report: dict[str, Any] = {"cases": 0, "outcomes": {}, "problems": [], "bomb_seconds": 0.0}
    with tempfile.TemporaryDirectory() as folder:
        for number, (kind, suffix, data, env) in enumerate(generate(seed, count)):
            path = Path(folder) / f"case{number}{suffix}"
            path.write_bytes(data)
            os.environ.clear()
            os.environ.update({**base_environment, **env})
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_INPUT)
            try:
                load_settings(str(path))
                outcome = "loaded"
            except SettingsError as error:
                outcome = _judged(str(error), str(path) if not env else "CELLSEG_")
            except BaseException as error:  # noqa: BLE001 - every other outcome is what this test reports
                outcome = f"{type(error).__name__}: {str(error)[:200]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            seconds = time.monotonic() - started
            report["cases"] += 1
            report["outcomes"].setdefault(kind, {}).setdefault(outcome.split(":")[0], 0)
            report["outcomes"][kind][outcome.split(":")[0]] += 1
            if kind.endswith("bomb"):
                report["bomb_seconds"] = max(report["bomb_seconds"], seconds)
            if outcome not in ("loaded", "refused") or seconds > SECONDS_PER_INPUT:
                report["problems"].append({"case": number, "kind": kind, "suffix": suffix, "outcome": outcome,
                                           "seconds": round(seconds, 2), "env": sorted(env),
                                           "head": data[:120].decode("utf-8", "replace")})
    print(json.dumps(report))


def _judged(message: str, culprit: str) -> str:
    """'refused' for a one-line message naming `culprit` and showing no secret, else what is wrong."""
    if len(message.splitlines()) != 1:
        return f"refused with a message of {len(message.splitlines())} lines"
    if culprit not in message:
        return f"refused without naming {culprit}: {message[:200]}"
    return "refused showing the secret" if SECRET in message else "refused"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_every_hostile_settings_input_is_loaded_or_refused_within_the_limits():
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}
    result = subprocess.run(
        [sys.executable, "-c", "from tests.reliability.test_settings_fuzz import run_cases; run_cases()",
         str(SEED), str(CASES)],
        cwd=REPO_ROOT, env={**clean, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, preexec_fn=_limit_memory, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["cases"] == CASES
    assert report["problems"] == [], json.dumps(report["problems"][:10], indent=1)
    assert report["bomb_seconds"] < BOMB_SECONDS
    outcomes = report["outcomes"]
    assert set(outcomes["valid"]) == {"loaded"}
    for kind in ("alias bomb", "deep yaml", "deep toml", "yaml tags", "garbage", "huge string"):
        assert outcomes[kind].get("refused", 0) > 0, (kind, outcomes[kind])
    assert outcomes["alias bomb"].get("loaded", 0) == 0


def test_an_alias_bomb_in_config_is_refused_at_once_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9, 9))  # 9 ** 9 values, as in the report
    assert len(bomb.read_bytes()) < 1000
    clean = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "cellseg"), "config", "show", "--config", str(bomb)],
                            env=clean, capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory, check=False)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"settings file '{bomb}'" in result.stderr and "YAML aliases" in result.stderr
    assert result.stdout == ""
    assert seconds < 60  # start-up included, on a loaded machine; it took 48 s and 3 GB in itself before
