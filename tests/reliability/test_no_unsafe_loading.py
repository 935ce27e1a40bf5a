"""No code path unpickles data it did not make: every torch.load is weights_only=True, and
nothing imports pickle, calls yaml.load, eval or exec."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("cellseg", "flows", "deployments", "benchmarks") for p in (ROOT / folder).rglob("*.py"))


def unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"line {node.lineno}: imports {name}" for name in names if name and name.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal", "shelve")]
        if isinstance(node, ast.Call):
            function = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if function == "torch.load" and keywords.get("weights_only") != "True":
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
            if function in ("yaml.load", "yaml.unsafe_load") and "SafeLoader" not in keywords.get("Loader", ""):
                found.append(f"line {node.lineno}: {function} without SafeLoader")
            if function in ("eval", "exec"):
                found.append(f"line {node.lineno}: {function}()")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_has_no_unsafe_deserialisation(path):
    assert unsafe_calls(ast.parse(path.read_text(), str(path))) == []


def test_the_checker_finds_what_it_looks_for():
    bad = "import pickle\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\neval('1')\n"
    assert len(unsafe_calls(ast.parse(bad))) == 4
    assert unsafe_calls(ast.parse("torch.load(f, weights_only=True)")) == []
