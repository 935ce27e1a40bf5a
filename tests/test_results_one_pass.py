"""`cellseg results` reads each image's metadata once (one request per image on object storage):
done, failed and unfinished images come from one pass over the store (`ResultStore.summary`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cellseg.cli import main
from cellseg.store import ResultStore
from tests.test_cli import _store_with_results


@pytest.fixture()
def store_url(tmp_path) -> str:
    """Two done images, one failed, one being written and one group with no record yet."""
    url = _store_with_results(tmp_path, ["done_0", "done_1"], ["bad_0"])
    store = ResultStore.open(url)
    store.root.require_group("half").attrs["cellseg"] = {"status": "writing", "source_url": "/in/half.png"}
    store.root.require_group("new")
    return url


@pytest.fixture()
def passes(monkeypatch) -> list[int]:
    """The passes over a store's records (`ResultStore.records`) from here on, each counted as it starts."""
    started: list[int] = []
    records = ResultStore.records

    def counted(self: ResultStore, on_record: Callable[[str], None] | None = None
                ) -> Iterator[tuple[str, dict[str, Any]]]:
        started.append(1)
        return records(self, on_record)

    monkeypatch.setattr(ResultStore, "records", counted)
    return started


def test_results_reads_the_store_once(store_url, passes, capsys):
    assert main(["results", store_url]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(passes) == 1
    assert lines[0] == f"{store_url}: 2 images done, 1 failed, 2 in progress or left by a stopped run"
    assert lines[1].startswith("model: ") and lines[2].startswith("image_id")
    assert [line.split()[0] for line in lines[3:5]] == ["done_0", "done_1"]
    assert "  failed: /in/bad_0.png: ImageReadError: file is empty" in lines
    assert "  not finished: /in/half.png" in lines and "  not finished: new" in lines


def test_results_json_reads_the_store_once(store_url, passes, capsys):
    assert main(["results", store_url, "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert len(passes) == 1
    assert [row["image_id"] for row in report["statistics"]] == ["done_0", "done_1"]
    assert report["failures"] == [{"image_id": "bad_0", "source_url": "/in/bad_0.png",
                                   "error": "ImageReadError: file is empty"}]
    assert report["unfinished"] == [{"image_id": "half", "source_url": "/in/half.png", "status": "writing"},
                                    {"image_id": "new", "source_url": None, "status": None}]
    assert report["damaged"] == []


def test_the_summary_groups_as_statistics_failures_and_unfinished_do(store_url):
    store = ResultStore.open(store_url, mode="r")

    summary = store.summary()

    assert summary.statistics == store.statistics()
    assert [row["image_id"] for row in summary.statistics] == ["done_0", "done_1"]
    assert summary.failures == store.failures() and [row["image_id"] for row in summary.failures] == ["bad_0"]
    assert summary.unfinished == store.unfinished()
    assert [row["status"] for row in summary.unfinished] == ["writing", None]
