"""Where a job's model comes from: registry versions, checkpoint files and the shipped models."""

from __future__ import annotations

import pytest


def test_a_job_naming_a_misspelt_shipped_model_is_told_the_one_it_meant(tmp_path):
    """`"model_version": "nucleii"` in a deployment's job was refused as an unknown registered
    version, without a word of the shipped models, as `models show` already said."""
    from cellseg.job_config import SegmentJob
    from cellseg.jobs_plan import model_source
    from cellseg.registry import RegistryError

    (tmp_path / "registry").mkdir()
    for registry, version, error, said in (
            ("registry", "nucleii", RegistryError, "has no version 'nucleii' (known: none); did you mean the shipped "
                                                   "model 'nuclei'?"),
            ("registry", "bundld", RegistryError, "did you mean the shipped model 'bundled'?"),
            ("none", "nucleus", RegistryError, "did you mean the shipped model 'nuclei'?")):
        job = SegmentJob(source_url="in", store_url="out.zarr", registry_url=str(tmp_path / registry),
                         model_version=version)
        with pytest.raises(error) as raised:
            model_source(job).pinned()
        assert str(raised.value).endswith(said), raised.value
