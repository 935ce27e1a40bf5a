"""Reading ahead: results in order, a failure or a hung read confined to its own item, memory
bounded by the byte limit; and, in `segment_images`, a read that hangs recorded as failed."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from cellseg import read_ahead
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import ImageReadError, read_image
from cellseg.read_ahead import ReadAhead, ReadTimeout
from cellseg.segment import model_record, segment_images
from cellseg.store import ResultStore

ITEMS = [(f"img{index}", f"/data/img{index}.png") for index in range(12)]


def take_all(reader: ReadAhead, batch: int) -> list[tuple[str, object]]:
    """(id, result or the exception raised for it) of every item, taken `batch` at a time."""
    outcomes = []
    while taken := reader.take(batch):
        for image_id, _, result in taken:
            try:
                outcomes.append((image_id, result()))
            except Exception as error:  # noqa: BLE001 - the outcome under test
                outcomes.append((image_id, error))
    return outcomes


def test_results_come_in_item_order_whatever_order_the_reads_finish_in():
    def read(url: str) -> str:
        time.sleep(0.02 * (len(url) % 4))  # later items often finish first
        return url.upper()

    with ReadAhead(ITEMS, read, len, min_ahead=2, threads=4) as reader:
        outcomes = take_all(reader, batch=3)
    assert outcomes == [(image_id, url.upper()) for image_id, url in ITEMS]


def test_a_failed_read_is_raised_for_its_own_item_and_the_others_are_read():
    def read(url: str) -> str:
        if url.endswith(("img3.png", "img7.png")):
            raise ImageReadError(f"'{url}': not a readable image")
        return url

    with ReadAhead(ITEMS, read, len, min_ahead=2) as reader:
        outcomes = take_all(reader, batch=2)
    assert [image_id for image_id, _ in outcomes] == [image_id for image_id, _ in ITEMS]
    failed = {image_id: str(outcome) for image_id, outcome in outcomes if isinstance(outcome, Exception)}
    assert failed == {"img3": "'/data/img3.png': not a readable image", "img7": "'/data/img7.png': not a readable image"}


def test_reads_ahead_stop_at_the_byte_limit_but_never_below_min_ahead():
    started: list[str] = []

    def read(url: str) -> bytes:
        started.append(url)
        return bytes(1000)

    def reads_started_after(reader: ReadAhead, expected: int) -> int:
        """The reads started once `expected` have (or 60 s passed), and a consumer's visits for 0.5 s
        more started none beyond them. Each read runs on a thread of its own, which a loaded machine
        may start long after it was asked to: "no read started in the last 50 ms" is no sign that
        none will."""
        deadline = time.monotonic() + 60
        while len(started) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
            reader.take(0)  # a consumer's visit: reads are topped up then
        for _ in range(10):  # room for one too many to start
            time.sleep(0.05)
            reader.take(0)
        return len(started)

    # One read under way at a time: a read still under way holds bytes not counted yet.
    with ReadAhead(ITEMS, read, len, min_ahead=2, max_bytes=3000, threads=1) as reader:
        # Two always; then more while the results held weigh less than 3000 bytes: 3 x 1000 stops it.
        assert reads_started_after(reader, 3) == 3
        assert [image_id for image_id, _, _ in reader.take(2)] == ["img0", "img1"]
        assert reads_started_after(reader, 5) == 5  # 1000 held, then two more
    started.clear()
    with ReadAhead(ITEMS, read, len, min_ahead=2, max_bytes=0) as reader:
        assert reads_started_after(reader, 2) == 2  # nothing beyond min_ahead
    started.clear()
    with ReadAhead(ITEMS, read, len, min_ahead=1, max_bytes=10**9, max_ahead=5) as reader:
        assert reads_started_after(reader, 5) == 5  # max_ahead bounds the count whatever the bytes


def test_a_read_that_hangs_is_given_up_after_the_timeout_and_the_next_are_read(tmp_path):
    fifo = tmp_path / "hangs.png"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a real read that hangs
    items = [("hangs", str(fifo)), ("after", "after")]

    def read(url: str) -> str:
        return "read" if url == "after" else str(read_image(url).shape)

    try:
        with ReadAhead(items, read, len, min_ahead=2, timeout=0.5) as reader:
            started = time.monotonic()
            outcomes = take_all(reader, batch=1)
            waited = time.monotonic() - started
        assert isinstance(outcomes[0][1], ReadTimeout) and str(fifo) in str(outcomes[0][1])
        assert "longer than 0.5 s" in str(outcomes[0][1])
        assert outcomes[1] == ("after", "read")
        assert waited < 5
    finally:
        with open(fifo, "wb"):  # lets the hung thread finish
            pass


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(str(tiny_checkpoint), PredictConfig(device="cpu", batch_size=2))


def test_segment_images_records_a_hung_read_as_failed_and_finishes_the_rest(
        tmp_path, synthetic_dataset, predictor, monkeypatch):
    monkeypatch.setattr(read_ahead, "READ_TIMEOUT", 0.5)
    fifo = tmp_path / "hangs.png"
    os.mkfifo(fifo)
    good = tmp_path / "synth_0000.png"
    shutil.copy(synthetic_dataset / "images" / "synth_0000.png", good)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    try:
        report = segment_images([("hangs", str(fifo)), ("synth_0000", str(good))], store, predictor,
                                model_record(predictor, "tiny/best.pt"))
    finally:
        with open(fifo, "wb"):
            pass
    assert report.done == ["synth_0000"]
    assert [(failure["image_id"], failure["error"].split(":")[0]) for failure in report.failed] == [("hangs", "ReadTimeout")]
    assert store.failures()[0]["image_id"] == "hangs" and "longer than 0.5 s" in store.failures()[0]["error"]
    assert store.read_mask("synth_0000").shape == (96, 96)


def test_closing_starts_no_more_reads():
    started = threading.Event()
    count: list[str] = []

    def read(url: str) -> str:
        count.append(url)
        started.set()
        return url

    reader = ReadAhead(ITEMS, read, len, min_ahead=2, max_bytes=0)
    started.wait(60)
    reader.close()
    assert reader.take(5) == []
    deadline = time.monotonic() + 60  # the two reads started before close run on threads of their own
    while len(count) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # room for a read started by take() to show
    assert sorted(count) == ["/data/img0.png", "/data/img1.png"]
