"""`python -m benchmarks.gpu`: skips cleanly without CUDA, runs its CPU check end to end without
Prefect, and on a CUDA machine measures the device it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
KEYS = {"device", "hardware", "model", "model_only", "model_only_peak_memory_bytes", "model_only_predictor",
        "model_only_compiled", "product", "product_parallel_shards", "ratios"}
RATIOS = {"gpu_model_vs_matmul", "gpu_model_vs_roofline", "gpu_model_compiled_vs_matmul", "gpu_product_vs_model_only",
          "gpu_product_2_shards_vs_model_only", "gpu_product_4_shards_vs_model_only"}


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "benchmarks.gpu", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run")
def test_without_cuda_it_says_so_and_exits_0():
    run = _bench()
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "no CUDA device: GPU benchmark skipped"


def test_cpu_check_writes_every_figure_without_prefect(tmp_path):
    out = tmp_path / "gpu.json"
    run = _bench("--device", "cpu", "--seconds", "1", "--model", "general", "--side", "128", "--max-images", "8",
                 "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")]
    assert not [name for name in imported if name.split(".")[0] in ("prefect", "s3fs", "moto")
                or name.startswith(("cellseg.flows", "benchmarks.run"))]
    result = json.loads(out.read_text())
    assert result.keys() >= KEYS and result["ratios"].keys() == RATIOS
    assert [row["batch_size"] for row in result["model_only"]] == [1, 2]
    compiled = result["model_only_compiled"]
    assert [row["batch_size"] for row in compiled] == [1] and compiled[0]["compiled"]
    assert compiled[0]["images_per_second"] > 0 and compiled[0]["compile_seconds"] > 0
    assert "model only, compiled, batch 1" in run.stdout
    assert result["model"]["side"] == 128 and result["model"]["gflop_per_image"] > 0
    # Conv and norm layers are some of the leaf modules, so they move part of all the bytes.
    assert 0 < result["model"]["roofline_bytes_per_image"] < result["model"]["all_leaf_bytes_per_image"]
    assert result["product"]["images"] >= 2 and result["product"]["images_per_second"] > 0
    assert all(value > 0 for value in result["ratios"].values())
    assert "product, 128^2" in run.stdout
    assert [run["parallel_shards"] for run in result["product_parallel_shards"]] == [2, 4]
    assert all(run["images"] >= 2 for run in result["product_parallel_shards"])
    assert "product, 4 shards at a time" in run.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_figures_name_the_device(tmp_path):
    out = tmp_path / "gpu.json"
    run = _bench("--seconds", "2", "--side", "256", "--max-images", "64", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == torch.cuda.get_device_name()
    assert [row["batch_size"] for row in result["model_only"]] == [1, 8, 32]
    assert [row["batch_size"] for row in result["model_only_compiled"]] == [8, 32]
    assert result["model_only_predictor"]["batch_size"] == 8
    assert result["hardware"]["matmul_tflops"] > 1 and result["hardware"]["copy_gb_per_s"] > 100
    assert result["product"]["images_per_second"] > 0 and all(value > 0 for value in result["ratios"].values())


def test_the_figures_are_saved_after_each_part():
    from benchmarks.gpu import bench_gpu

    saved: list[set[str]] = []
    result = bench_gpu("cpu", "general", 1.0, 96, 4, save=lambda figures: saved.append(set(figures)))
    # The model alone first, then the product, then shards side by side, the compiled passes last.
    assert "model_only_predictor" in saved[0] and "product" not in saved[0]
    assert "product" in saved[1] and "product_parallel_shards" not in saved[1]
    assert "product_parallel_shards" in saved[2] and "model_only_compiled" not in saved[2]
    assert saved[-1] == set(result) and len(saved) == 4
