"""Small files (JSON documents, metadata, checkpoints) read whole but bounded in size: at most
`max_bytes` + 1 bytes are read, in the one request a whole read makes, and a longer file is refused
naming it (`FileTooLarge`), before anything allocates or parses what a hostile file declares."""

from __future__ import annotations

from typing import Any


class FileTooLarge(ValueError):
    """A file longer than any of its kind may be."""


def read_at_most(fs: Any, path: str, max_bytes: int, what: str = "") -> bytes:
    """The whole of the file at `path` on fsspec filesystem `fs`, which may hold at most `max_bytes`
    (`what` says what such a file is, for the error)."""
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


def _size(count: int) -> str:
    return f"{count // 2**20} MiB" if count % 2**20 == 0 else f"{count} bytes"
