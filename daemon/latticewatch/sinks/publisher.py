"""ZeroMQ PUB of the daemon's events: multipart ``[topic, JSON]``, never blocking the pipeline.

The publisher is a sink of the durable event log (`latticewatch.runtime.eventlog.EventLog`): each
event is sent exactly as it was appended to ``events.jsonl`` (same bytes, same deterministic id),
once it is durable. Topics:

=========================  =====================================================================
``latticewatch.frame``     one per analysed frame
``latticewatch.particle``  one per region
``latticewatch.defect``    particles labelled ``stacking_fault`` (also sent on ``particle``)
``latticewatch.error``     input that could not be analysed, archive trouble
``latticewatch.warning``   notices (a source's frames carry no pixel size)
``latticewatch.status``    periodic: fps, backlog, budget overruns, drops (not in the log)
=========================  =====================================================================

A slow or dead subscriber never slows the pipeline: the socket's send high-water mark bounds
what ZeroMQ buffers, every send is ``NOBLOCK``, and an event that does not fit is dropped and
counted (``counters["dropped"]``, in the next status event and the metrics). The socket is an
XPUB with ``XPUB_NODROP`` (plain PUB drops silently, so drops could not be counted); the price is
that while one subscriber of a topic sits at its high-water mark, that topic's events are
dropped for all its subscribers. Every event is in the durable log: ``latticewatch events
--since <last id seen>`` fills the gap.

With ``curve_secret_key`` and ``curve_clients`` the socket is a CURVE server
(`latticewatch.io.curve`): traffic is encrypted and only subscribers whose public key is in the
directory complete the handshake.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from latticewatch.sinks.events import Event, PublisherCounters, StatusEvent, now, topics

log = logging.getLogger(__name__)

TOPIC_PREFIX = "latticewatch."


class EventPublisher:
    """A bound PUB socket fed by the event log (a `latticewatch.sinks.events.Sink`), plus a periodic status event.

    Parameters
    ----------
    address
        Endpoint to bind, e.g. ``tcp://127.0.0.1:5557``.
    high_water_mark
        Messages ZeroMQ queues per subscriber before dropping.
    status_interval_s
        Seconds between status events; ``0`` sends none.
    status
        Called for the status event's fields (fps, backlog, overruns …; see `StatusEvent`).
    curve_secret_key, curve_clients
        Both or neither: the daemon's CURVE secret key file and the directory of allowed subscriber keys.

    Examples
    --------
    >>> from latticewatch.sinks.events import error_event
    >>> pub = EventPublisher("tcp://127.0.0.1:0")
    >>> pub.consume([error_event("cam:7", "", "header is not JSON")])
    >>> pub.counters["sent"] + pub.counters["dropped"]
    1
    >>> pub.close()
    """

    name = "publisher"

    def __init__(self, address: str, *, high_water_mark: int = 1000, status_interval_s: float = 5.0,
                 status: Callable[[], dict[str, Any]] | None = None, context: zmq.Context | None = None,
                 curve_secret_key: Path | None = None, curve_clients: Path | None = None) -> None:
        if (curve_secret_key is None) != (curve_clients is None):
            raise ValueError("curve_secret_key and curve_clients go together: give both or neither")
        self._context = context or zmq.Context.instance()
        # XPUB with NODROP is PUB for subscribers, but a full subscriber queue makes a NOBLOCK send
        # fail (EAGAIN) instead of dropping silently — so drops are counted, and nothing waits.
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.XPUB_NODROP, 1)
        self._socket.setsockopt(zmq.SNDHWM, high_water_mark)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve_secret_key is not None:
            from latticewatch.io.curve import curve_server

            try:
                curve_server(self._socket, secret_key_file=curve_secret_key, clients_dir=curve_clients,
                             domain="events")
            except BaseException:
                self._socket.close(linger=0)
                raise
        self._socket.bind(address)
        self.address = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.counters = {"sent": 0, "dropped": 0, "status": 0}
        self._lock = threading.Lock()  # sockets are not thread-safe: the log's writers and the status thread share it
        self._status = status
        self._interval = status_interval_s
        self._stop = threading.Event()
        self._run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        self._seq = 0
        self._thread = None
        if status_interval_s > 0:
            self._thread = threading.Thread(target=self._status_loop, name="latticewatch-status", daemon=True)
            self._thread.start()

    def consume(self, events: Sequence[Event]) -> None:
        """Send the events of one append to the log, each on its topics, as the line logged."""
        for event in events:
            payload = event.rendered().encode()
            for topic in topics(event):
                self._send(topic, payload)

    def send_status(self) -> StatusEvent:
        """Send one status event now; returns it."""
        self._seq += 1
        fields = self._status() if self._status is not None else {}
        with self._lock:
            counters = PublisherCounters(**self.counters)
        event = StatusEvent(event_id=f"status/{self._run_id}/{self._seq}", at=now(), **fields, publisher=counters)
        self._send("status", event.rendered().encode())
        self.counters["status"] += 1
        return event

    def _send(self, topic: str, payload: bytes) -> None:
        with self._lock:
            try:
                self._socket.send_multipart([(TOPIC_PREFIX + topic).encode(), payload], flags=zmq.NOBLOCK)
                self.counters["sent"] += 1
            except zmq.Again:  # a subscriber at its high-water mark: drop, count, go on
                self.counters["dropped"] += 1

    def _status_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.send_status()
            except Exception:
                log.exception("status event failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._socket.close(linger=0)
