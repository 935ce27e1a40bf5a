"""`benchmarks.product_stages`: each stage of the product timed alone, on real images, a real model
and a real store."""

from __future__ import annotations

from benchmarks.product_stages import bench_product_stages, ratios, table_rows
from cellseg.io import list_images


def test_every_stage_is_timed_and_the_bound_follows_from_them(tiny_checkpoint, synthetic_dataset):
    result = bench_product_stages(tiny_checkpoint, list_images(str(synthetic_dataset / "images")), count=4)
    assert result["images"] == 4 and result["forward_ms"] > 0 and result["cells_per_image"] > 0
    assert set(result["stages_ms"]) == {"read", "normalise", "split", "statistics", "cell_table", "write", "image_copy"}
    assert all(ms > 0 for name, ms in result["stages_ms"].items() if name != "image_copy")
    rest = sum(result["stages_ms"].values())
    assert result["bound_vs_model_only"] == result["forward_ms"] / (result["forward_ms"] + rest)
    assert ratios(result)["product_stages_bound_vs_model_only"] == result["bound_vs_model_only"]
    assert "forward" in table_rows(result)[0][1]
