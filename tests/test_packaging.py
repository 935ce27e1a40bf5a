"""What `pip install cellseg` gives: a library that runs without Prefect and Dask, the flows and
deployments under the project's own name, and `cellseg flow` naming the extra it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

# Runs `cellseg` in a Python that cannot import the orchestration extra's packages.
WITHOUT_ORCHESTRATION = textwrap.dedent("""
    import sys

    class NoOrchestration:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("prefect", "prefect_dask", "distributed", "dask"):
                raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    sys.meta_path.insert(0, NoOrchestration())
    from cellseg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_without_orchestration(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_ORCHESTRATION, *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_library_segments_without_prefect_or_dask(tmp_path):
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=2, size=64, seed=1)
    result = run_without_orchestration("predict", "--images", str(tmp_path / "data/images"),
                                       "--out", str(tmp_path / "out.zarr"))
    assert result.returncode == 0, result.stderr
    assert "segmented 2" in result.stdout


@pytest.mark.parametrize("command", [["flow", "segment-images", "--source", "a", "--store", "b"],
                                     ["tune", "--images", "a", "--masks", "b"], ["serve"]])
def test_flow_commands_name_the_extra_they_need(command):
    result = run_without_orchestration(*command)
    assert result.returncode == 2
    assert "pip install 'cellseg[orchestration]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_wheel_installs_flows_and_deployments_under_the_project_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cellseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cellseg/flows/segment.py" in names and "cellseg/deployments/prefect.yaml" in names
    assert "cellseg/models/general.pt" in names
    assert not [name for name in names if name.split("/")[0] in ("flows", "deployments", "tests", "benchmarks")]
    metadata = next(name for name in names if name.endswith("METADATA"))
    requirements = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    core = [line for line in requirements if "extra ==" not in line]
    assert not [line for line in core if any(name in line for name in ("prefect", "distributed", "dask"))]
    assert any("prefect" in line and "extra == \"orchestration\"" in line for line in requirements)
    assert any(line.startswith("Requires-Dist: torch") and "extra" not in line for line in requirements)
