"""DatasetError: a dataset that cannot be used as given (pairing, reading a mask, loading a pair)."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the files at fault."""
