"""The README's examples run as written."""

from __future__ import annotations

import re

import numpy as np

from tests.conftest import REPO_ROOT


def test_python_example_runs(tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["mask"].dtype == np.bool_ and namespace["mask"].shape == (128, 128)
    assert 0.0 < namespace["result"].best_metrics["val_dice"] <= 1.0
    assert (tmp_path / "runs/py1/best.pt").is_file()


def test_python_example_segments_with_the_shipped_model_before_any_training(tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    before_training = example[:example.index("job = TrainJob(")]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(before_training, "README.md", "exec"), namespace)
    found, cells = namespace["found"], namespace["cells"]
    assert found.labels.dtype == np.int32 and found.labels.shape == namespace["image"].shape == (128, 128)
    assert found.statistics["cell_count"] == found.labels.max() == len(cells) > 0
    assert cells["label"].tolist() == list(range(1, len(cells) + 1))
    assert cells["area"].sum() == (found.labels > 0).sum() == found.statistics["total_cell_area"]
    assert namespace["nuclei"].model_version.startswith("nuclei-")
    assert not (tmp_path / "runs").exists()


def test_command_line_example_makes_a_version_current_before_predicting_with_it():
    """Run top to bottom, the walk-through's `--model-version current` needs a current version."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("## Python")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line.split("#")[0].split() for line in block.splitlines()]
    uses_current = next(at for at, words in enumerate(commands) if "current" in words and "predict" in words)
    makes_current = [words for words in commands[:uses_current]
                     if (words[1] == "tune" and "--promote" in words) or words[1:3] == ["models", "promote"]]
    assert makes_current, "`predict --model-version current` with no earlier command making a version current"
