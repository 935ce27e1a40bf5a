"""benchmarks.storage's write rows on a real S3 server: write_result with the direct writes and
through s3fs, against zarr's own calls, with the requests s3fs made."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import s3fs

from benchmarks.storage import bench_writes, write_rows
from cellseg import s3_direct
from cellseg.measure import cell_measurements
from cellseg.synth import generate_sample


@pytest.mark.integration
def test_the_write_rows_compare_direct_writes_with_s3fs_on_seaweedfs(seaweedfs_endpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": seaweedfs_endpoint})
    s3fs.S3FileSystem(skip_instance_cache=True).makedirs("bench-writes-test", exist_ok=True)
    rng = np.random.default_rng(0)
    results = []
    for _ in range(2):
        sample = generate_sample(rng, (128, 128))
        cells = sample.labels.astype(np.int32)
        results.append({"image": sample.image, "mask": (cells > 0).astype(np.uint8), "cells": cells,
                        "table": cell_measurements(cells, sample.image).astype(np.float64)})
    writes = bench_writes(results, {"local folder": str(tmp_path / "w.zarr"), "SeaweedFS": "s3://bench-writes-test/w.zarr"})
    assert set(writes["local folder"]) == {"zarr calls", "write_result"}
    s3 = writes["SeaweedFS"]
    assert set(s3) == {"zarr calls", "write_result", "write_result through s3fs"}
    # The direct writes leave s3fs only the look for an existing image; through s3fs every object is its request.
    assert s3["write_result"]["s3fs_requests_per_image"] == 1
    assert s3["write_result through s3fs"]["s3fs_requests_per_image"] >= 12
    assert all(way["ms_per_image"] > 0 and way["cpu_ms_per_image"] > 0 for way in s3.values())
    assert s3_direct.enabled()  # left on
    rows = write_rows(writes)
    assert [row[0] for row in rows] == ["write one 512^2 result, local folder", "write one 512^2 result, SeaweedFS",
                                        "  the same through s3fs (direct_s3_writes=false), SeaweedFS"]
    assert "1 s3fs requests" in rows[1][1] and "CPU" in rows[2][1]
