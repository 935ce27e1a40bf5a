"""Small files (JSON documents, metadata, checkpoints) read whole but bounded in size: a file on
local disk longer than `max_bytes` is refused from its size, one on object storage having read at
most `max_bytes` + 1 bytes in the one request a whole read makes, naming it (`FileTooLarge`),
before anything allocates or parses what a hostile file declares. Which kind of filesystem a
read is on (`protocols`, `is_local`) is told here too."""

from __future__ import annotations

from typing import Any


class FileTooLarge(ValueError):
    """A file longer than any of its kind may be."""


def read_at_most(fs: Any, path: str, max_bytes: int, what: str = "") -> bytes:
    """The whole of the file at `path` on fsspec filesystem `fs`, which may hold at most `max_bytes`
    (`what` says what such a file is, for the error)."""
    try:
        data = bounded_cat(fs, path, max_bytes)
    except OSError:  # S3 answers a ranged read of an empty object 416, "range not satisfiable"
        if is_empty(fs, path):
            return b""
        raise
    if data is None:
        raise too_large(path, max_bytes, what or "such a file")
    return bytes(data)


def bounded_cat(fs: Any, path: str, max_bytes: int) -> bytes | None:
    """The file at `path` on `fs`, or None when it holds more than `max_bytes`: on local disk told
    from its size (a read of max_bytes would set aside that many bytes first), elsewhere having
    read at most max_bytes + 1 bytes. Storage errors pass unchanged."""
    if is_local(fs):
        return None if fs.size(path) > max_bytes else fs.cat_file(path)
    if protocols(fs) & {"http", "https"}:
        return _streamed(fs, path, max_bytes)
    data = fs.cat_file(path, start=0, end=max_bytes + 1)
    return None if len(data) > max_bytes else data


STREAM_READ_BYTES = 1 << 20


def _streamed(fs: Any, path: str, max_bytes: int) -> bytes | None:
    """`bounded_cat` over HTTP, read from the response as it arrives: a server may ignore the Range
    of a ranged read (Python's http.server does) and send the whole file, which fsspec's cat_file
    reads whole before anything could stop it."""
    parts, total = [], 0
    # block_size 0: one GET, read as a stream; a size given: no HEAD first, which fsspec would turn
    # any error of (403, 503) into FileNotFoundError; the Range for the servers that honour it
    headers = {**fs.kwargs.get("headers", {}), "Range": f"bytes=0-{max_bytes}"}
    with fs.open(path, "rb", block_size=0, size=max_bytes + 1, headers=headers) as stream:
        while total <= max_bytes and (part := stream.read(min(STREAM_READ_BYTES, max_bytes + 1 - total))):
            parts.append(part)
            total += len(part)
    return None if total > max_bytes else b"".join(parts)


def too_large(path: str, max_bytes: int, what: str) -> FileTooLarge:
    """The error of a file at `path` longer than the `max_bytes` that `what` may take."""
    return FileTooLarge(f"'{path}' is larger than the {_size(max_bytes)} that {what} may take; not read")


def protocols(fs: Any) -> set[str]:
    """The protocol names of fsspec filesystem `fs` (fsspec gives one, or a tuple of aliases)."""
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def is_local(fs: Any) -> bool:
    """Whether `fs` is the local file system (where folders may be symbolic links)."""
    return bool(protocols(fs) & {"file", "local"})


def is_empty(fs: Any, path: str) -> bool:
    """Whether the file at `path` holds 0 bytes (False when its size cannot be read either)."""
    try:
        return fs.size(path) == 0
    except OSError:
        return False


def _size(count: int) -> str:
    return f"{count // 2**20} MiB" if count % 2**20 == 0 else f"{count} bytes"
