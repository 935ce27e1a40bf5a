"""The docs match the code: every shell command in the README and docs/ is checked against what
it calls. `cellseg` lines parse with the real argument parser (a renamed or removed flag fails
here), `make` targets exist, `python -m benchmarks.*` and `dask` lines name options their --help
lists, and every `prefect` command and deployment they name is one the deployment tests run
against a real server. What runs them for real: tests/test_cli.py, test_settings.py,
test_deployments.py, test_quality_command.py and `make demo`."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "infra" / "README.md"]
# Commands these docs show that need what CI machines lack (Docker) or are plain shell.
NOT_RUN_HERE = {"docker": "needs a Docker daemon", "export": "shell", "cat": "shell"}


def shell_commands() -> list[tuple[str, str]]:
    """(doc name, command) for every command line in the docs' bash blocks, continuations joined,
    comments and here-document bodies dropped."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", doc.read_text(), re.S):
            heredoc_end = None
            for line in block.replace("\\\n", " ").splitlines():
                if heredoc_end is not None:
                    heredoc_end = None if line.strip() == heredoc_end else heredoc_end
                    continue
                marker = re.search(r"<<'?(\w+)'?", line)
                heredoc_end = marker.group(1) if marker else None
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value before the command
                    words = words[1:]
                if words:
                    commands.append((doc.relative_to(REPO_ROOT).as_posix(), shlex.join(words)))
    return commands


COMMANDS = shell_commands()


def by_program(program: str) -> list[tuple[str, str]]:
    return [(doc, command) for doc, command in COMMANDS if command.split()[0] == program]


def test_the_docs_show_commands_of_every_kind():
    programs = {command.split()[0] for _, command in COMMANDS}
    assert {"cellseg", "make", "prefect", "python"} <= programs
    assert programs <= {"cellseg", "make", "prefect", "python", "dask", "bash", *NOT_RUN_HERE}, programs


@pytest.mark.parametrize("doc,command", by_program("bash"), ids=lambda value: value[:70])
def test_documented_scripts_exist_and_parse(doc, command):
    script = Path(shlex.split(command)[1])
    assert script.is_file(), f"{doc}: {command}"
    subprocess.run(["bash", "-n", str(script)], check=True)


def _concrete(words: list[str]) -> list[str]:
    """A synopsis line (`list|show`, `[--json]`, `...`) as one concrete command: first alternatives,
    optional parts included, ellipses dropped."""
    concrete = []
    for raw in words:
        word = raw.strip("[]")
        if word and word != "...":
            concrete.append(word.split("|")[0])
    return concrete


@pytest.mark.parametrize("doc,command", by_program("cellseg"), ids=lambda value: value[:70])
def test_documented_cellseg_commands_parse(doc, command):
    words = shlex.split(command)[1:]
    synopsis = any(mark in word for word in words for mark in ("|", "[", "..."))
    if not synopsis:
        build_parser().parse_args(words)  # SystemExit (argparse error) fails the test
    # Synopsis or not: the (sub)command exists and every option shown is spelt as it is defined
    # (argparse would also take an abbreviation).
    words = _concrete(words)
    parser = build_parser()
    for name in (word for word in words if not word.startswith("-")):
        subcommands = next((action.choices for action in parser._actions if isinstance(getattr(action, "choices", None), dict)), None)
        if not subcommands or name not in subcommands:
            break
        parser = subcommands[name]
    known = {option for action in parser._actions for option in action.option_strings}
    unknown = [word for word in words if word.startswith("--") and word not in known]
    assert not unknown, f"{doc}: {command}: {unknown} not options of '{parser.prog}'"


@pytest.mark.parametrize("doc,command", by_program("make"), ids=lambda value: value[:70])
def test_documented_make_targets_exist(doc, command):
    targets = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    for target in shlex.split(command)[1:]:
        assert target in targets, f"{doc}: make {target} is not a Makefile target"


@functools.cache
def _help(program: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`program --help`, run once per program (the docs show some tools a dozen times)."""
    return subprocess.run([*program, "--help"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False)


@pytest.mark.parametrize("doc,command", by_program("python") + by_program("dask"), ids=lambda value: value[:70])
def test_documented_tools_take_the_options_shown(doc, command):
    words = shlex.split(command)
    program = (sys.executable, *words[1:3]) if words[0] == "python" else (str(Path(sys.executable).parent / "dask"), words[1])
    result = _help(program)
    assert result.returncode == 0, result.stderr
    for option in (word for word in words if word.startswith("--")):
        assert option in result.stdout, f"{doc}: {command}: {option} not in its --help"


DEPLOYMENT_TESTS = [REPO_ROOT / "tests" / name for name in
                    ("test_deployments.py", "test_nightly_schedule.py", "test_worker_loss.py")
                    if (REPO_ROOT / "tests" / name).exists()]


def test_documented_prefect_commands_are_the_ones_the_deployment_tests_run():
    tested = "".join(path.read_text() for path in [*DEPLOYMENT_TESTS, REPO_ROOT / "benchmarks" / "servers.py"])
    for doc, command in by_program("prefect"):
        words = [word for word in shlex.split(command)[1:] if not word.startswith("-")]
        subcommand = ", ".join(f'"{word}"' for word in words[:2] if re.fullmatch(r"[a-z][a-z-]*", word))
        assert subcommand and subcommand in tested, f"{doc}: '{command}' is not run by the deployment tests"
        for deployment in re.findall(r"\b[\w-]+/[\w-]+\b", command):
            if not deployment.startswith(("deployments/", "lab-")) and "/" in deployment and "." not in deployment:
                assert f'"{deployment}"' in tested, f"{doc}: deployment {deployment} is not run by the tests"


def test_commands_not_run_here_are_only_the_listed_kinds():
    skipped = [command for _, command in COMMANDS if command.split()[0] in NOT_RUN_HERE]
    assert all(command.split()[0] in ("docker", "export", "cat") for command in skipped)


def test_store_docs_python_examples_run(tmp_path, monkeypatch, tiny_checkpoint):
    pytest.importorskip("ome_zarr")
    from cellseg.config import PredictConfig
    from cellseg.infer import Predictor
    from cellseg.io import list_images
    from cellseg.segment import model_record, pending_images, segment_images
    from cellseg.store import ResultStore
    from cellseg.synth import write_dataset
    from cellseg.tables import write_table

    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=7)
    store = ResultStore.open(str(tmp_path / "runs/demo/results.zarr"))
    predictor = Predictor.from_checkpoint(str(tiny_checkpoint), PredictConfig())
    todo, _ = pending_images(list_images(str(tmp_path / "data/images")), store)
    segment_images(todo, store, predictor, model_record(predictor, str(tiny_checkpoint)))
    # What the documented `cellseg export ... --out runs/demo/cells.parquet` writes (Parquet, by its name).
    write_table(store.cell_rows(), str(tmp_path / "runs/demo/cells.parquet"), "parquet")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "docs" / "store.md").read_text(), re.S)
    assert len(blocks) == 4
    namespaces = []
    for block in blocks:
        namespaces.append({})
        exec(compile(block, "docs/store.md", "exec"), namespaces[-1])
    ome = next(namespace for namespace in namespaces if "labels" in namespace)
    assert set(ome["labels"]) == {"cells", "mask"} and ome["image"].shape == (96, 96)
    assert (ome["labels"]["cells"].compute() == store.read_cells("synth_0000")).all()
    listed = next(namespace for namespace in namespaces if "nodes" in namespace)
    assert [node.zarr.basename() for node in listed["nodes"]] == ["synth_0000", "labels", "cells", "mask"]
    table = next(namespace for namespace in namespaces if "per_image" in namespace)
    assert table["per_image"]["cells"].to_dict() == {row["image_id"]: row["cell_count"] for row in store.statistics()}
