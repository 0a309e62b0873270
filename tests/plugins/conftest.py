"""The DECTRIS plugin's tests: a simulated detector and a source on it, over a real 127.0.0.1 socket."""

from __future__ import annotations

import pytest

from dectris_stream import Consumer
from latticewatch_dectris import make_source
from latticewatch_dectris.simulator import DectrisSimulator


@pytest.fixture
def stream():
    """``open(protocol, **options) -> (simulator, source, consumer)``; all closed afterwards."""
    opened = []

    def open_(protocol="v1", **options):
        sim = DectrisSimulator(protocol)
        source = make_source({"protocol": protocol, "endpoint": sim.endpoint, "poll_interval_s": 0.02, **options})
        consumer = Consumer(source)
        opened.append((sim, consumer))
        return sim, source, consumer

    yield open_
    for sim, consumer in opened:
        consumer.close()
        sim.close()
