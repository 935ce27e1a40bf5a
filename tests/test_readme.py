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
