"""Small files (JSON documents, metadata, checkpoints) read whole but bounded in size: a file on
local disk longer than `max_bytes` is refused from its size, one on object storage having read at
most `max_bytes` + 1 bytes in the one request a whole read makes, naming it (`FileTooLarge`),
before anything allocates or parses what a hostile file declares."""

from __future__ import annotations

from typing import Any


class FileTooLarge(ValueError):
    """A file longer than any of its kind may be."""


def read_at_most(fs: Any, path: str, max_bytes: int, what: str = "") -> bytes:
    """The whole of the file at `path` on fsspec filesystem `fs`, which may hold at most `max_bytes`
    (`what` says what such a file is, for the error)."""
    if is_local(fs):  # from its size: a read of max_bytes would set aside that many bytes first
        if fs.size(path) > max_bytes:
            raise FileTooLarge(f"'{path}' is larger than the {_size(max_bytes)} that {what or 'such a file'} may take; "
                               "not read")
        data = fs.cat_file(path)
    else:
        try:
            data = fs.cat_file(path, start=0, end=max_bytes + 1)
        except OSError as error:  # S3 answers a ranged read of an empty object 416, "range not satisfiable"
            if "not satisfiable" in str(error) or "InvalidRange" in str(error):
                return b""
            raise
    if len(data) > max_bytes:
        raise FileTooLarge(f"'{path}' is larger than the {_size(max_bytes)} that {what or 'such a file'} may take; "
                           "not read")
    return bytes(data)


def is_local(fs: Any) -> bool:
    """Whether fsspec filesystem `fs` is the local disk."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _size(count: int) -> str:
    return f"{count // 2**20} MiB" if count % 2**20 == 0 else f"{count} bytes"
