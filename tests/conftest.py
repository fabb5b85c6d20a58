"""Fixtures the unit tests share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """Traversable by other uids (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="vmspawnd-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)
