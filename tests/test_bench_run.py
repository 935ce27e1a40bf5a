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


def test_accounted_tells_a_process_s_own_cpu_from_the_machine_s_idle_time():
    import time

    from benchmarks.run import _in_situ_rows, accounted

    _, seconds, waiting = accounted(time.sleep, 0.3)
    assert seconds >= 0.3 and waiting["process_cpu_seconds"] < 0.1
    assert waiting["idle_fraction"] is None or 0.0 <= waiting["idle_fraction"] <= 1.0

    def spin(cpu_seconds: float) -> None:  # by this process's CPU, not the clock: a loaded machine shares its cores
        until = time.process_time() + cpu_seconds
        while time.process_time() < until:
            pass

    _, seconds, spinning = accounted(spin, 0.3)
    assert 0.25 <= spinning["process_cpu_seconds"] <= seconds + 0.05

    product = {"cpu_ms_per_image": {"read": 2.0, "model": 70.0, "labels": 9.0, "write": 4.0},
               "cpu_ms_per_image_process": 90.0, "idle_fraction": 0.05}
    rows = _in_situ_rows(product, {"cpu_ms_per_image_process": 72.0, "idle_fraction": 0.04})
    assert rows[0][2].startswith("the rest 0.21 of the model's CPU")
    assert rows[1][1] == "90.0 / 72.0" and rows[1][2].startswith("0.80x: stages 85.0")
    assert "cores idle 5.0% (model only 4.0%)" in rows[1][2]


def test_a_benchmarks_help_describes_it_by_its_docstrings_whole_first_paragraph():
    """--help showed the docstring's first line, which stops mid-sentence."""
    import subprocess
    import sys

    from benchmarks import quality
    from benchmarks.output import first_paragraph

    assert first_paragraph("Quality of a model,\nmeasured the README's way.\n\nDetails.") == \
        "Quality of a model, measured the README's way."
    shown = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--help"], capture_output=True, text=True,
                           check=True, timeout=120).stdout
    assert " ".join(shown.split()).count(first_paragraph(quality.__doc__)) == 1
