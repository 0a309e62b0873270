"""The dashboard sink and its HTTP server (stdlib only): the live page, server-sent events, the verdict API.

Routes
------
``/``                      the page (``static/index.html`` + ``dashboard.js`` + ``dashboard.css``; no CDN)
``/events``                server-sent events: one ``snapshot`` message whenever something changed (at most
                           ``max_rate_hz`` a second), a comment every 15 s to keep proxies quiet;
                           ``?max_s=N`` ends the stream after N s (the page passes its own ``?sse_max_s=N``)
``/api/state``             the same snapshot as JSON (the page loads it first)
``/api/verdict/latest``    keep/skip verdict of the latest analysed frame (503 until one is analysed)
``/thumbnail.png``         the latest frame, small, regions outlined by class
``/healthz``               ``ok``: the process is alive and serving
``/readyz``                200 when the daemon is ready (sources up, models loaded, ledger writable), else 503;
                           JSON ``{"ready": …, "checks": {name: "ok" or the problem}}``

The sink is fed by the durable event log: `DashboardSink.consume` (called from the pipeline's
threads) records counters, the runner's timings and errors, stores a reference to the latest
frame and sets two events. PNG rendering, the verdict file and the broadcasting to browsers run
on the sink's own threads; a browser that does not keep up has its queue filled and is dropped
(it reconnects and starts from a fresh snapshot).

The daemon binds the port when it opens its outputs (so a port in use is reported at once) but
listens only once its sources, models and state are up (`DashboardSink.serve`): until then a
connection is refused, never answered with a state that does not exist yet.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from latticewatch.frame import Analysis, Frame
from latticewatch.io.atomic import write_atomic
from latticewatch.io.jsonio import dumps
from latticewatch.sinks.dashboard.state import DashboardState, VerdictRule
from latticewatch.sinks.events import Event, FrameEvent
from latticewatch.sinks.reports import overlay_image

log = logging.getLogger(__name__)

#: ``() -> (ready, checks)``: what ``/readyz`` answers; each check is ``"ok"`` or the problem.
Readiness = Callable[[], tuple[bool, dict[str, str]]]

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}


def _static(name: str) -> bytes:
    return resources.files("latticewatch.sinks.dashboard").joinpath("static", name).read_bytes()


class _Client:
    def __init__(self, size: int) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=size)
        self.dropped = False


class _Hub:
    """Fan-out of SSE messages; a client whose queue is full is dropped, never waited for."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self.dropped = 0

    def join(self) -> _Client:
        client = _Client(self.queue_size)
        with self._lock:
            self._clients.add(client)
        return client

    def leave(self, client: _Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def send(self, message: bytes) -> None:
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.queue.put_nowait(message)
            except queue.Full:
                client.dropped = True
                self.dropped += 1
                self.leave(client)
                log.warning("dashboard: a slow browser was dropped (%d messages behind)", self.queue_size)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients), set()
        for client in clients:
            client.dropped = True
            try:
                client.queue.put_nowait(None)
            except queue.Full:
                pass

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._clients)


class DashboardSink:
    """Sink + HTTP server of the live dashboard and the verdict API.

    Parameters
    ----------
    host, port
        Where to listen (``port=0``: a free port, see `url`).
    rule
        The verdict rule.
    verdict_file
        ``None``: no file. A bare name: written next to each frame's file (folder sources). An
        absolute path: always there.
    history, thumbnail_px, sse_queue, max_rate_hz, budget_ms
        Bounds and pacing (see the README's ``[dashboard]`` table).
    serve
        Listen at once; ``False``: bind the port only, `serve` later.

    Examples
    --------
    >>> sink = DashboardSink(port=0)
    >>> sink.url.startswith("http://127.0.0.1:")
    True
    >>> sink.close()
    """

    name = "dashboard"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 8088, rule: VerdictRule = VerdictRule(),
                 verdict_file: str | None = None, history: int = 1000, thumbnail_px: int = 384, sse_queue: int = 16,
                 max_rate_hz: float = 4.0, budget_ms: float | None = None, serve: bool = True) -> None:
        self.state = DashboardState(history=history, budget_ms=budget_ms, rule=rule)
        self.hub = _Hub(sse_queue)
        self.thumbnail_px = thumbnail_px
        self.verdict_file = verdict_file
        self.max_rate_hz = max_rate_hz
        self._png: bytes = b""
        self._png_lock = threading.Lock()
        self._latest: tuple[Frame, Analysis, dict[str, Any]] | None = None
        self._latest_lock = threading.Lock()
        self._work = threading.Event()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self.readiness: Readiness | None = None
        self.server = ThreadingHTTPServer((host, port), _handler(self), bind_and_activate=False)
        self.server.daemon_threads = True
        try:
            self.server.server_bind()
        except OSError:
            self.server.server_close()
            raise
        self._threads = [threading.Thread(target=self._render_loop, name="dashboard-render", daemon=True),
                         threading.Thread(target=self._broadcast_loop, name="dashboard-sse", daemon=True)]
        for t in self._threads:
            t.start()
        if serve:
            self.serve()

    def serve(self, readiness: Readiness | None = None) -> None:
        """Listen on the bound port; ``readiness`` answers ``/readyz`` (without it: ready while serving)."""
        self.readiness = readiness
        self.server.server_activate()
        http = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                name="dashboard-http", daemon=True)
        http.start()
        self._threads.append(http)
        log.info("dashboard on %s", self.url)

    @property
    def thumbnail_png(self) -> bytes:
        """The latest frame's thumbnail as PNG (empty before the first one is rendered)."""
        with self._png_lock:
            return self._png

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    # the event log's side: never blocks
    def consume(self, events: Sequence[Event]) -> None:
        """Record the events of one append to the log: runner timings, errors, and the analysis of a frame event.

        A frame event read back from the ledger after a restart has no analysis with it: only its
        timings are shown.
        """
        for event in events:
            self.state.add_runner_event(event)
            if isinstance(event, FrameEvent) and event.analysed is not None:
                frame, analysis = event.analysed
                verdict = self.state.add_analysis(frame, analysis)
                with self._latest_lock:
                    self._latest = (frame, analysis, verdict)
                self._work.set()
        self._changed.set()

    def close(self) -> None:
        self._stop.set()
        self._work.set()
        self._changed.set()
        self.hub.close()
        if any(t.name == "dashboard-http" for t in self._threads):
            self.server.shutdown()  # waits for serve_forever, which never started without `serve`
        self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)

    # the sink's own threads
    def _render_loop(self) -> None:
        while not self._stop.is_set():
            self._work.wait()
            self._work.clear()
            with self._latest_lock:
                latest, self._latest = self._latest, None
            if latest is None or self._stop.is_set():
                continue
            frame, analysis, verdict = latest  # only the newest: when behind, older thumbnails are skipped
            try:
                if self.verdict_file:
                    self._write_verdict(frame, verdict)
                image = overlay_image(frame, analysis, max_side=2 * self.thumbnail_px)
                image.thumbnail((self.thumbnail_px, self.thumbnail_px))
                buf = io.BytesIO()
                image.save(buf, format="PNG", optimize=False)
                with self._png_lock:
                    self._png = buf.getvalue()
                self.state.set_thumbnail(frame.frame_id, analysis.out_of_domain)
                self._changed.set()
            except Exception:  # the page just keeps the previous thumbnail
                log.exception("dashboard: thumbnail of %s failed", frame.frame_id)

    def _write_verdict(self, frame: Frame, verdict: dict[str, Any]) -> None:
        target = Path(self.verdict_file)
        if not target.is_absolute():
            origin = Path(frame.origin.split("#", 1)[0]) if frame.origin else None
            if origin is None or not origin.parent.is_dir():
                return  # a stream frame: no folder to write next to
            target = origin.parent / target
        try:
            write_atomic(target, (dumps(verdict) + "\n").encode())
        except OSError as err:
            log.warning("dashboard: cannot write the verdict file %s: %s", target, err)

    def _broadcast_loop(self) -> None:
        sent = -1
        while not self._stop.is_set():
            self._changed.wait(timeout=1.0)
            self._changed.clear()
            if self._stop.is_set():
                break
            if self.hub.count and self.state.version != sent:
                snap = self.state.snapshot()
                sent = snap["version"]
                self.hub.send(b"event: snapshot\ndata: " + dumps(snap, separators=(",", ":")).encode() + b"\n\n")
            self._stop.wait(1.0 / self.max_rate_hz)  # coalesce bursts


def _max_seconds(path: str) -> float | None:
    """``/events?max_s=2``: end the stream after 2 s (the browser reconnects); for headless browsers whose
    virtual clock waits for open requests."""
    from urllib.parse import parse_qs, urlsplit

    try:
        value = float(parse_qs(urlsplit(path).query).get("max_s", ["0"])[0])
    except ValueError:
        return None
    return value if value > 0 else None


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request to the dashboard; `_handler` binds it to a sink."""

    server_version = "latticewatch-dashboard"
    protocol_version = "HTTP/1.1"
    timeout = 30  # a client that stops reading is cut off
    sink: DashboardSink

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=60" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, dumps(data).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            name, ctype = STATIC[path]
            self._send(HTTPStatus.OK, _static(name), ctype)
        elif path in self.ROUTES:
            self.ROUTES[path](self)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _verdict(self) -> None:
        verdict = self.sink.state.verdict
        if verdict is None:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"verdict": None, "reason": "no frame analysed yet",
                                                       "rule": str(self.sink.state.rule)})
        else:
            self._json(HTTPStatus.OK, verdict)

    def _state(self) -> None:
        self._json(HTTPStatus.OK, self.sink.state.snapshot())

    def _thumbnail(self) -> None:
        png = self.sink.thumbnail_png
        if png:
            self._send(HTTPStatus.OK, png, "image/png")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"no frame yet\n", "text/plain")

    def _healthz(self) -> None:
        self._send(HTTPStatus.OK, b"ok\n", "text/plain")

    def _readyz(self) -> None:
        ready, checks = self.sink.readiness() if self.sink.readiness is not None else (True, {})
        self._json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready, "checks": checks})

    def _events(self) -> None:
        max_s = _max_seconds(self.path)
        client = self.sink.hub.join()
        until = time.monotonic() + max_s if max_s else None
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            first = dumps(self.sink.state.snapshot(), separators=(",", ":")).encode()
            self.wfile.write(b"retry: 2000\nevent: snapshot\ndata: " + first + b"\n\n")
            self.wfile.flush()
            while not client.dropped and (until is None or time.monotonic() < until):
                try:
                    wait = min(15.0, max(until - time.monotonic(), 0.01)) if until else 15.0
                    message = client.queue.get(timeout=wait)
                except queue.Empty:
                    message = b": keep-alive\n\n"
                if message is None:
                    break
                self.wfile.write(message)
                self.wfile.flush()
        except OSError:
            pass  # the browser went away
        finally:
            self.sink.hub.leave(client)

    ROUTES = {"/api/verdict/latest": _verdict, "/api/state": _state, "/thumbnail.png": _thumbnail,
              "/healthz": _healthz, "/readyz": _readyz, "/events": _events}


def _handler(sink: DashboardSink) -> type[BaseHTTPRequestHandler]:
    """The request handler class of one sink's server."""
    return type("Handler", (_Handler,), {"sink": sink})
