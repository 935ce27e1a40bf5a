"""docs/operations.md, "Backups of the registry and the stores", followed as written on a store
restored with a chunk whose bytes a bad copy changed."""

from __future__ import annotations

import re
import shlex

import numpy as np

from cellseg.store import ResultStore
from cellseg.verify import verify_store
from tests.conftest import REPO_ROOT, cellseg

DOCUMENTED_STORE = "s3://lab-results/nightly.zarr"


def documented_store_checks() -> list[list[str]]:
    """The `cellseg verify` commands of the backup section, in order, as argument lists."""
    section = (REPO_ROOT / "docs/operations.md").read_text().split("## Backups of the registry and the stores")[1]
    commands = re.findall(r"^cellseg (verify .*?)(?:\s+#.*)?$", section, flags=re.MULTILINE)
    return [shlex.split(command) for command in commands]


def test_the_documented_checks_after_a_restore_leave_no_damaged_image_done(tmp_path):
    store = ResultStore.open(str(tmp_path / "restored.zarr"))
    cells = np.zeros((40, 40), np.int32)
    cells[5:15, 5:15] = 1
    for image_id in ("a", "b"):
        store.write_result(
            image_id,
            cells > 0,
            {"cell_count": 1, "mean_cell_area": 100.0},
            f"/in/{image_id}.png",
            {"version": "0123456789ab"},
            cells=cells,
        )
    chunk = tmp_path / "restored.zarr/a/labels/cells/0/c.0.0"
    chunk.write_bytes(b"changed by a bad copy")

    checks = documented_store_checks()
    assert checks and all(DOCUMENTED_STORE in check for check in checks)
    for check in checks:
        cellseg(*[str(store.url) if arg == DOCUMENTED_STORE else arg for arg in check], check=False)

    assert verify_store(str(store.url), read_data=True).broken == []
    assert set(ResultStore.open(str(store.url), mode="r").done_ids()) == {"b"}  # the next run redoes 'a'


def test_a_check_that_decoded_the_chunks_suggests_a_repair_that_decodes_them_too(tmp_path):
    """`verify --read-data` finds a chunk damage that `verify --repair` alone would not see, so the
    repair it suggests carries --read-data."""
    store = ResultStore.open(str(tmp_path / "restored.zarr"))
    cells = np.zeros((40, 40), np.int32)
    cells[5:15, 5:15] = 1
    store.write_result("a", cells > 0, {"cell_count": 1, "mean_cell_area": 100.0}, "/in/a.png",
                       {"version": "0123456789ab"}, cells=cells)
    (tmp_path / "restored.zarr/a/labels/cells/0/c.0.0").write_bytes(b"changed by a bad copy")

    found = cellseg("verify", str(store.url), "--read-data", check=False)
    assert found.returncode == 1
    suggested = re.search(r"to repair: (cellseg verify .*)$", found.stdout, flags=re.MULTILINE)
    assert suggested, found.stdout
    cellseg(*shlex.split(suggested.group(1))[1:])
    assert verify_store(str(store.url), read_data=True).broken == []
