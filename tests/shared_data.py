"""Where the read-only shared data sets live: ``$LATTICEWATCH_SHARED_DATA``, else ``../shared/data`` beside the repo.

Tests that need one skip, naming the folder they looked in, when it is absent.
"""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("LATTICEWATCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name: str, marker: str = "") -> Path:
    """``SHARED_DATA / name``; skips the calling test when ``name/marker`` is not there."""
    path = SHARED_DATA / name
    if not (path / marker).exists():
        pytest.skip(f"shared data set {name!r} not found in {SHARED_DATA} (set LATTICEWATCH_SHARED_DATA)")
    return path


def requires(name: str, marker: str = ""):
    """A skip mark for whole modules or parametrised tests that need ``name/marker``."""
    path = SHARED_DATA / name
    missing = f"shared data set {name!r} not found in {SHARED_DATA} (set LATTICEWATCH_SHARED_DATA)"
    return pytest.mark.skipif(not (path / marker).exists(), reason=missing)
