"""Dashboard aggregation and the sink's HTTP side (real sockets on a free 127.0.0.1 port)."""

import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from latticewatch.sinks.dashboard import DashboardSink, DashboardState, VerdictRule, size_histograms
from latticewatch.sinks.events import RunnerInfo, error_event, frame_events

ON_TIME = RunnerInfo(phases_s={}, latency_s=0.1, budget_ms=None, overrun=False)


@pytest.fixture
def events_of(analysed):
    """``events_of(k, [(label, diameter_nm), …], runner=…)``: what the event log hands the dashboard for one frame."""

    def make(k, labels_diameters, runner=ON_TIME):
        return frame_events(*analysed(k, labels_diameters), runner)

    return make


def test_size_histograms_bins_cover_the_data_and_fraction_per_bin():
    d = np.array([1.0, 1.5, 3.2, 3.9, 9.9])
    labels = np.array(["stacking_fault", "no_stacking_fault", "stacking_fault", "stacking_fault", "empty"])
    h = size_histograms(d, labels, bins=5)
    assert h["edges"][0] == 0 and h["edges"][-1] > 9.9
    assert sum(sum(v) for v in h["counts"].values()) == 5
    assert h["defect_fraction"][0] == 0.5 and h["oriented"][0] == 2
    assert h["defect_fraction"][1] == 1.0
    assert h["defect_fraction"][-1] is None  # only an "empty" particle there


def test_state_counts_series_rolling_fraction_and_bounds(analysed):
    state = DashboardState(history=5, particles=7, rolling=2)
    for k in range(8):
        labels = [("stacking_fault", 3.0), ("no_stacking_fault", 4.0), ("no_stacking_fault", 5.0)]
        state.add_analysis(*analysed(k, labels))
    snap = state.snapshot()
    assert snap["totals"]["frames"] == 8 and snap["totals"]["particles"] == 24
    assert snap["class_totals"]["stacking_fault"] == 8 and snap["class_totals"]["no_stacking_fault"] == 16
    assert len(snap["series"]) == 5  # bounded history
    assert snap["series"][-1]["defect_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    assert snap["series"][-1]["rolling"] == pytest.approx(1 / 3, abs=1e-4)
    assert sum(sum(v) for v in snap["sizes"]["counts"].values()) == 7  # bounded particle memory
    json.dumps(snap)  # the page gets it as JSON


def test_runner_events_give_latency_overruns_and_errors(events_of):
    state = DashboardState(budget_ms=100)
    runner = RunnerInfo(latency_s=0.3, phases_s={"x": 0.2}, overrun=True, budget_ms=100)
    frame, particle = events_of(0, [("empty", 2.0)], runner)
    state.add_runner_event(frame)
    state.add_runner_event(error_event("b", "/x.mrc", "bad header"))
    state.add_runner_event(particle)  # ignored
    snap = state.snapshot()
    assert snap["totals"]["overruns"] == 1 and snap["latency"]["last_s"] == 0.3
    assert snap["errors"][0]["problem"] == "bad header" and snap["totals"]["errors"] == 1


def test_verdict_rule(analysed):
    rule = VerdictRule(min_particles=2, min_coverage=0.01)
    state = DashboardState(rule=rule)
    assert state.add_analysis(*analysed(0, [("empty", 2.0)]))["verdict"] == "skip"
    v = state.add_analysis(*analysed(1, [("empty", 2.0), ("stacking_fault", 3.0)], coverage_px=100))
    assert v["verdict"] == "keep" and v["particle_count"] == 2 and v["rule"] == str(rule)


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_sink_serves_page_verdict_thumbnail_and_events(tmp_path, events_of):
    sink = DashboardSink(port=0, rule=VerdictRule(min_particles=2), verdict_file=str(tmp_path / "verdict.json"),
                         max_rate_hz=20)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            get(sink.url + "/api/verdict/latest")
        assert err.value.code == 503
        status, ctype, body = get(sink.url + "/")
        assert status == 200 and b"dashboard.js" in body and b"http" not in body.replace(b"http-equiv", b"")  # no CDN
        assert b"EventSource" in get(sink.url + "/dashboard.js")[2]
        stream = urllib.request.urlopen(sink.url + "/events", timeout=5)
        assert stream.headers["Content-Type"] == "text/event-stream"
        sink.consume(events_of(3, [("stacking_fault", 3.0)]))
        verdict = json.loads(get(sink.url + "/api/verdict/latest")[2])
        assert verdict["frame_id"] == "cam:3" and verdict["verdict"] == "skip"
        deadline = time.monotonic() + 10
        while not (tmp_path / "verdict.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads((tmp_path / "verdict.json").read_text())["frame_id"] == "cam:3"
        while json.loads(get(sink.url + "/api/state")[2])["thumbnail"] != {"version": 1, "frame_id": "cam:3",
                                                                  "out_of_domain": []}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, ctype, png = get(sink.url + "/thumbnail.png")
        assert ctype == "image/png" and png.startswith(b"\x89PNG")
        seen = b""
        while b'"frames":1' not in seen:  # a snapshot after the frame arrives on the open stream
            seen += stream.readline()
            assert time.monotonic() < deadline
        stream.close()
    finally:
        sink.close()


def test_slow_browser_is_dropped_and_the_sink_never_waits(events_of):
    sink = DashboardSink(port=0, sse_queue=2, max_rate_hz=50)
    try:
        s = socket.create_connection(sink.server.server_address[:2])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never read
        time.sleep(0.3)
        started = time.perf_counter()
        for k in range(300):
            sink.consume(events_of(k, [("stacking_fault", 3.0)] * 20))
        assert time.perf_counter() - started < 5  # consume only records
        deadline = time.monotonic() + 30
        k = 300
        while sink.hub.dropped == 0:  # keep the page changing until the kernel buffers are full
            assert time.monotonic() < deadline, "the stalled browser was never dropped"
            sink.consume(events_of(k, [("stacking_fault", 3.0)] * 20))
            k += 1
            time.sleep(0.01)
        assert sink.hub.count == 0
        s.close()
    finally:
        sink.close()
