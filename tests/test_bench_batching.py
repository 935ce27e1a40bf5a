"""`benchmarks.batching`: the nuclei model's passes counted and timed at two batch sizes."""

from __future__ import annotations

from benchmarks.batching import bench_batching, synthetic_images


def test_images_of_one_shape_share_passes_and_keep_their_scales():
    images = synthetic_images(2, side=160) * 2  # each image twice: its copy takes its shape at every pass
    result = bench_batching("nuclei", images, "cpu", [1, 4], rounds=1)
    alone, together = result["rows"]
    assert (alone["batch_size"], together["batch_size"]) == (1, 4)
    assert alone["images_per_pass"] == 1.0 and alone["passes"] >= len(images)
    assert together["passes"] < alone["passes"] and together["images_per_pass"] > 1.0
    assert alone["same_scales_as_first"] and together["same_scales_as_first"]
    assert all(row["seconds"] > 0 for row in result["rows"])
