"""Bounded reads over HTTP, from a real server that ignores the Range a ranged read sends (Python's
own http.server): fsspec's cat_file read such a server's whole answer before anything could stop it.
Its errors stay what they are: fsspec's open, asked for a file's size first, made any of them
"not found"."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from benchmarks.servers import free_port, stop_process_group, wait_until_ready
from cellseg.bounded_reads import bounded_cat
from cellseg.io import ImageReadError, read_bytes

MiB = 2**20


# Python's http.server (which answers every GET with the whole file, whatever its Range), with two
# paths that answer errors a storage server gives: 403 (no access) and 503 (busy, try again)
SERVER = """
import functools, http.server, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        if self.path in ("/denied.bin", "/busy.bin"):
            self.send_error(403 if self.path == "/denied.bin" else 503)
            return None
        return super().send_head()

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])),
                                functools.partial(Handler, directory=sys.argv[2])).serve_forever()
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(base URL, the folder it serves) of `python -m http.server` on loopback."""
    folder = tmp_path_factory.mktemp("served")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(folder)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(base + "/", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until_ready(answers, server, "http.server")
        yield base, folder
    finally:
        stop_process_group(server)


def test_the_server_sends_the_whole_file_whatever_range_is_asked(served):
    base, folder = served
    (folder / "ranged.bin").write_bytes(bytes(range(256)) * 16)
    request = urllib.request.Request(f"{base}/ranged.bin", headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200 and len(answer.read()) == 4096  # what makes the bound cellseg's to keep


def test_a_file_over_the_bound_is_refused_having_read_little_more_than_the_bound(served):
    base, folder = served
    (folder / "large.bin").write_bytes(b"\x01" * (8 * MiB))
    fs = fsspec.filesystem("http")
    tracemalloc.start()
    try:
        assert bounded_cat(fs, f"{base}/large.bin", MiB) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak  # cat_file's whole answer: 8 MiB and its copies
    with pytest.raises(ImageReadError, match=r"large\.bin': file is over 1048576 bytes"):
        read_bytes(f"{base}/large.bin", max_bytes=MiB)


def test_a_file_within_the_bound_is_read_whole(served):
    base, folder = served
    data = bytes(range(256)) * (3 * MiB // 256 + 7)
    (folder / "within.bin").write_bytes(data)
    assert read_bytes(f"{base}/within.bin", max_bytes=len(data)) == data
    assert bounded_cat(fsspec.filesystem("http"), f"{base}/within.bin", len(data) - 1) is None


def test_a_server_error_is_not_taken_for_a_missing_file(served):
    base, _ = served
    with pytest.raises(ImageReadError, match=r"missing\.bin': file not found"):
        read_bytes(f"{base}/missing.bin", max_bytes=MiB)
    for name, status in (("denied.bin", "403"), ("busy.bin", "503")):
        with pytest.raises(Exception) as raised:
            read_bytes(f"{base}/{name}", max_bytes=MiB)
        assert "not found" not in str(raised.value) and status in str(raised.value), raised.value
