"""docs/operations.md, "The nightly run": what a run read from its Prefect variable, in its log."""

from __future__ import annotations

import pytest

from tests.test_flows import run_log_messages

pytestmark = pytest.mark.integration


def test_a_nightly_run_logs_which_images_and_store_its_variable_named(prefect_harness, tiny_checkpoint, tmp_path):
    from prefect.variables import Variable

    from cellseg.flows.segment import segment_images_flow
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "incoming"), count=1, size=64, seed=3)
    name = f"cellseg_nightly_{tmp_path.name.replace('-', '_')}"
    source, store = str(tmp_path / "incoming/images"), str(tmp_path / "nightly.zarr")
    Variable.set(name, {"source_url": source, "store_url": store, "checkpoint_url": str(tiny_checkpoint)})

    state = segment_images_flow(job_variable=name, return_state=True)

    assert state.is_completed(), state.message
    messages = run_log_messages(state.state_details.flow_run_id)
    assert (
        f"segmenting new images under {source} into {store} (the job the Prefect variable '{name}' holds)" in messages
    )
