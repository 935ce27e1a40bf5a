"""Fixtures shared by the reliability tests."""

from __future__ import annotations

import pytest

from cellseg.registry import Registry


@pytest.fixture(scope="module")
def registry(tiny_checkpoint, tmp_path_factory) -> str:
    """A registry whose current version is the tiny test checkpoint."""
    url = str(tmp_path_factory.mktemp("registry"))
    Registry(url).register(str(tiny_checkpoint), promote=True)
    return url
