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
    # As segment_images feeds them: one call an image at batch size 1, one call of all four above it.
    assert (alone["images_per_call"], together["images_per_call"]) == (1, 4)
    assert alone["same_scales_as_first"] and together["same_scales_as_first"]
    assert all(row["seconds"] > 0 for row in result["rows"])
    # The network's passes are most of a CPU run's time; what is left is the host's share.
    assert all(0 < row["host_ms_per_image"] < row["seconds"] * 1e3 / len(images) for row in result["rows"])


def test_host_time_leaves_the_network_as_it_was():
    from benchmarks.batching import passes_and_seconds
    from cellseg.bundled import shipped_checkpoint
    from cellseg.checkpoint import load_checkpoint
    from cellseg.config import PredictConfig
    from cellseg.infer import Predictor

    predictor = Predictor(load_checkpoint(shipped_checkpoint("nuclei")), PredictConfig(device="cpu"))
    run = passes_and_seconds(predictor, [synthetic_images(1, side=96)])
    assert 0 < run["network_seconds"] < run["seconds"]
    assert "features" not in vars(predictor.model)  # the timing wrapper is gone
    assert not predictor.model._forward_hooks and not predictor.model._forward_pre_hooks
