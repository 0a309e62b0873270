"""Versioned JSON Schemas (draft 2020-12) of the daemon's events, one file per event type.

``<type>.v<N>.json``; the version changes when a field is removed or changes meaning (adding
fields does not: the schemas allow more). The ``latticewatch.defect`` topic carries particle
events, so ``defect.v1.json`` is the particle schema with ``label`` fixed to ``stacking_fault``.

The files are generated from the event models (`latticewatch.sinks.events`) by `generate_schema`;
after changing a model, regenerate them with ``python -m latticewatch.schemas`` (a test checks
that the shipped files equal the generated ones).

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
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from latticewatch.io.atomic import write_atomic
from latticewatch.sinks.events import (
    DEFECT_LABEL,
    SCHEMA_VERSION,
    ErrorEvent,
    FrameEvent,
    ParticleEvent,
    StatusEvent,
    WarningEvent,
)

#: The model behind each schema (a topic without the ``latticewatch.`` prefix).
MODELS: dict[str, type[BaseModel]] = {"defect": ParticleEvent, "error": ErrorEvent, "frame": FrameEvent,
                                      "particle": ParticleEvent, "status": StatusEvent, "warning": WarningEvent}
SCHEMAS = tuple(MODELS)
DEFECT_DESCRIPTION = "A particle event of a stacking-fault particle (sent on latticewatch.particle too)."


def load_schema(event_type: str, version: int = SCHEMA_VERSION) -> dict[str, Any]:
    """The shipped JSON Schema of an event type (a topic without the ``latticewatch.`` prefix)."""
    text = resources.files("latticewatch.schemas").joinpath(f"{event_type}.v{version}.json").read_text(encoding="utf-8")
    return json.loads(text)


class _Generator(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # the property names say it


def generate_schema(event_type: str) -> dict[str, Any]:
    """The JSON Schema of an event type, generated from its model (what the shipped file must hold).

    The schema describes the JSON as sent (serialisation mode: fields always written are required).
    The models refuse unknown fields, but the schemas allow them, so that a consumer keeps
    validating when a later version adds a field.

    Examples
    --------
    >>> generate_schema("defect")["properties"]["label"]
    {'const': 'stacking_fault'}
    >>> generate_schema("frame") == load_schema("frame")
    True
    """
    schema = MODELS[event_type].model_json_schema(mode="serialization", schema_generator=_Generator)
    body = _tidy(schema, schema.pop("$defs", {}))
    body.pop("title")
    body["description"] = " ".join(body["description"].split())  # the model's docstring, unwrapped
    if event_type == "defect":
        body["description"] = DEFECT_DESCRIPTION
        body["properties"]["label"] = {"const": DEFECT_LABEL}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://latticewatch.invalid/schemas/{event_type}.v{SCHEMA_VERSION}.json",
            "title": f"latticewatch.{event_type} v{SCHEMA_VERSION}", **body}


def _tidy(node: Any, defs: dict[str, Any]) -> Any:
    """Nested models inlined (without their titles), and no ``additionalProperties: false``."""
    if isinstance(node, list):
        return [_tidy(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        nested = {k: v for k, v in defs[node["$ref"].rpartition("/")[2]].items() if k != "title"}
        node = {**nested, **{k: v for k, v in node.items() if k != "$ref"}}
    return {k: _tidy(v, defs) for k, v in node.items() if not (k == "additionalProperties" and v is False)}


def write_schemas(directory: str | Path | None = None) -> list[Path]:
    """Write every generated schema as ``<type>.v<N>.json`` (default: this package, the shipped files).

    Examples
    --------
    >>> import tempfile
    >>> [p.name for p in write_schemas(tempfile.mkdtemp())][:2]
    ['defect.v1.json', 'error.v1.json']
    """
    directory = Path(__file__).parent if directory is None else Path(directory)
    paths = []
    for event_type in SCHEMAS:
        path = directory / f"{event_type}.v{SCHEMA_VERSION}.json"
        write_atomic(path, (json.dumps(generate_schema(event_type), indent=2, ensure_ascii=False) + "\n").encode())
        paths.append(path)
    return paths
