"""`make bench`'s own rows (benchmarks/run.py) that can be checked without the whole run."""

from __future__ import annotations

from benchmarks.run import fast_path_agreement
from cellseg.runtime import cpu_has_native_bf16


def test_the_fast_path_is_compared_with_fp32_only_where_it_is_not_fp32(tiny_checkpoint, synthetic_dataset):
    agreement = fast_path_agreement({"synthetic": (tiny_checkpoint, synthetic_dataset / "images")})
    if cpu_has_native_bf16():
        assert agreement["synthetic"]["images"] == 24 and agreement["synthetic"]["dice"] > 0.99
    else:  # the default pass is plain fp32 here: fp32 against itself would show a meaningless 100%
        assert agreement == {}
