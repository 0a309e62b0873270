"""DECTRIS detectors (EIGER, ARINA, QUADRO …) as a latticewatch frame source.

Reads the SIMPLON stream interface, v1 (multipart JSON + binary, port 9999) and v2 (CBOR, port
31001), and ships a simulator of it (`latticewatch_dectris.simulator`). The source kind is
registered as ``dectris`` in the ``latticewatch.sources`` entry point group.

Importing this package is cheap; ZeroMQ and the codecs load when a source is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from latticewatch_dectris.source import DectrisSource

__all__ = ["make_source"]


def make_source(options: dict[str, Any]) -> DectrisSource:
    """Build a DECTRIS stream source from its config table; see `latticewatch_dectris.source.make_source`.

    Examples
    --------
    >>> make_source({"protocol": "v2"}).endpoint
    'tcp://127.0.0.1:31001'
    """
    from latticewatch_dectris.source import make_source as build

    return build(options)
