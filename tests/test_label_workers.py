"""Labelling and measuring in worker processes: the same results as in the calling thread, and a
worker that dies fails only the images it held; the compiled steps warmed up ahead of a run."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.config import PredictConfig
from cellseg.label_workers import LabelWorkerError, LabelWorkers, label_and_measure, warm_up
from cellseg.postprocess import CellMaps
from cellseg.synth import generate_sample


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(7)
    drawn = [generate_sample(rng, (160, 160)) for _ in range(3)]
    return [(CellMaps(sample.mask.astype(np.float32)), sample.image) for sample in drawn]


def test_processes_give_what_the_calling_thread_gives(samples):
    config = PredictConfig(device="cpu")
    with LabelWorkers(2) as workers:
        measured = [workers.run(maps, image, config, {}) for maps, image in samples]
    for (maps, image), result in zip(samples, measured, strict=True):
        expected = label_and_measure(maps, image, config, {})
        assert result.labels.max() > 1  # several cells, so the comparison means something
        np.testing.assert_array_equal(result.labels, expected.labels)
        assert result.statistics == expected.statistics
        assert result.cell_table is not None and expected.cell_table is not None
        np.testing.assert_array_equal(result.cell_table[1], expected.cell_table[1])


def test_a_dead_worker_fails_its_image_and_a_new_pool_takes_the_next(samples):
    config = PredictConfig(device="cpu")
    (maps, image), (next_maps, next_image) = samples[0], samples[1]
    with LabelWorkers(1) as workers:
        workers.run(maps, image, config, {})
        for process in list(workers._pool._processes.values()):  # the test plays the OOM killer
            process.kill()
            process.join()
        with pytest.raises(LabelWorkerError, match="stopped before it answered"):
            workers.run(maps, image, config, {})
        result = workers.run(next_maps, next_image, config, {})
    np.testing.assert_array_equal(result.labels, label_and_measure(next_maps, next_image, config, {}).labels)


def test_ctrl_c_to_the_process_group_leaves_the_workers_to_the_parent(samples):
    """A terminal's Ctrl-C reaches every process of its group: a worker it interrupted died, and the
    images the parent was writing failed with LabelWorkerError. The parent alone decides to stop."""
    import os
    import signal
    import time

    config = PredictConfig(device="cpu")
    (maps, image), (next_maps, next_image) = samples[0], samples[1]
    with LabelWorkers(1) as workers:
        workers.run(maps, image, config, {})
        for process in list(workers._pool._processes.values()):
            os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)  # taken while idle: Python's default ended the worker there
        result = workers.run(next_maps, next_image, config, {})
        assert all(process.is_alive() for process in workers._pool._processes.values())
    np.testing.assert_array_equal(result.labels, label_and_measure(next_maps, next_image, config, {}).labels)


def test_warm_up_compiles_both_splits_and_the_table_for_common_image_types():
    from cellseg import measure, stats, watershed

    warm_up()
    assert watershed._split_all.signatures  # its markers and flood are compiled into it
    measured = {signature[1].dtype.name for signature in measure._pixel_sums.signatures}
    assert {"uint8", "uint16", "float32"} <= measured
    summed = {signature[0].dtype.name for signature in stats._inside_and_total.signatures}
    assert {"uint8", "uint16"} <= summed
