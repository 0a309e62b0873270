"""The manifest model's own consistency rules."""

import json

import pytest
from pydantic import ValidationError

from latticewatch.models.manifest import Manifest
from latticewatch_nanoparticles import profile_dir as PROFILE_DIR


def test_segmentation_and_isolation_thresholds_must_agree():
    raw = json.loads((PROFILE_DIR / "manifest.json").read_text())
    Manifest.model_validate(raw)
    raw["isolation"]["threshold"] = raw["segmentation"]["threshold"] + 0.1
    with pytest.raises(ValidationError, match="isolation.threshold"):
        Manifest.model_validate(raw)
