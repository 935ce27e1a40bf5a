"""A fault-injecting HTTP proxy to put in front of the loopback moto S3 server.

Requests pass through unchanged unless a `Fault` matches them: then the proxy answers with an
S3 error (503 SlowDown, 500 InternalError, 403 AccessDenied, ...) or stalls before forwarding,
the way a flaky or misconfigured object store behaves. Every injected fault is counted, so a
test can check that faults really happened.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

S3_ERROR = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault</RequestId></Error>'
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Fault:
    """Answer requests whose method and path match with an error (or a stall), `times` times (None: always)."""

    name: str
    path: str  # regular expression searched in the request path (with its query string)
    methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE")
    status: int = 503
    code: str = "SlowDown"
    stall_seconds: float = 0.0  # > 0: wait this long, then forward (a client timeout shorter than this fails)
    times: int | None = 1
    injected: int = field(default=0, init=False)

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and re.search(self.path, path) is not None and (
            self.times is None or self.injected < self.times)


class FaultyProxy:
    """A threaded proxy on a free loopback port forwarding to `upstream` (http://host:port)."""

    def __init__(self, upstream: str, faults: list[Fault] | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.faults = list(faults or [])
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def injected(self, name: str | None = None) -> int:
        return sum(f.injected for f in self.faults if name is None or f.name == name)

    def _claim_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests[method] += 1
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.injected += 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._claim_fault(self.command, self.path)
                if fault is not None and fault.stall_seconds <= 0:
                    payload = b"" if self.command == "HEAD" else S3_ERROR.format(
                        code=fault.code, message=f"injected by the test proxy ({fault.name})").encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault is not None:
                    time.sleep(fault.stall_seconds)
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a stall longer than its timeout)
                finally:
                    connection.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        return Handler

    @contextmanager
    def running(self) -> Iterator[FaultyProxy]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
