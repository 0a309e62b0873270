"""Versioned JSON Schemas (draft 2020-12) of the daemon's events, one file per event type.

``<type>.v<N>.json``; the version changes when a field is removed or changes meaning (adding
fields does not: the schemas allow more). The ``latticewatch.defect`` topic carries particle
events, so ``defect.v1.json`` is the particle schema with ``label`` fixed to ``stacking_fault``.

Examples
--------
>>> sorted(SCHEMAS)
['defect', 'error', 'frame', 'particle', 'status', 'warning']
>>> load_schema("frame")["$id"]
'https://latticewatch.invalid/schemas/frame.v1.json'
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

VERSION = 1
SCHEMAS = ("defect", "error", "frame", "particle", "status", "warning")


def load_schema(event_type: str, version: int = VERSION) -> dict[str, Any]:
    """The JSON Schema of an event type (a topic without the ``latticewatch.`` prefix)."""
    text = resources.files("latticewatch.schemas").joinpath(f"{event_type}.v{version}.json").read_text(encoding="utf-8")
    return json.loads(text)
