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
