"""Events and metrics of a real running daemon: a SUB socket and HTTP scrapes against `latticewatch run`.

One daemon subprocess (shipped nanoparticles profile, so particles get real classes and the
defect fraction has a value) watches a folder into which `SerialEMStack` writes frames, beside
a malformed file. The tests validate every message it actually sent against the shipped JSON
Schemas, scrape its /metrics, ask a real Prometheus (Debian's package) about the defect fraction
when the binary is installed, and replay its durable log with `latticewatch events`.
"""

import itertools
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jsonschema
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from latticewatch.schemas import SCHEMAS, load_schema
from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction
from latticewatch.testing.replay import SHIPPED_FRAMES, SerialEMStack, labelled_frames
from waiting import wait_until

N_FRAMES = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    incoming = tmp / "incoming"
    incoming.mkdir()
    zmq_port, metrics_port = free_port(), free_port()
    config = tmp / "lw.toml"
    config.write_text(
        'profile = "nanoparticles"\ndata_dir = "data"\n[runtime]\nthreads = 1\n'
        f'[events]\naddress = "tcp://127.0.0.1:{zmq_port}"\nstatus_interval_s = 0.2\n'
        f'[metrics]\nport = {metrics_port}\n'
        '[sources.scope]\nkind = "folder"\npath = "incoming"\nsettle_s = 0.3\n'
    )
    log = open(tmp / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"latticewatch.")
    sub.connect(f"tcp://127.0.0.1:{zmq_port}")
    messages = []

    def receive(timeout_ms=100):
        if sub.poll(timeout_ms):
            while True:
                try:
                    messages.append(sub.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break

    try:
        # the subscription is live once status events arrive: only then write frames (no slow-joiner loss)
        wait_until(lambda: (receive(), any(m[0] == b"latticewatch.status" for m in messages))[1], 120,
                   "the first status event")
        (incoming / "broken.mrc").write_bytes(b"MRC? no." * 200)
        # the demo's labelled abTEM frames: the shipped profile finds faulted and clean oriented particles in them
        _, labelled = labelled_frames(SHIPPED_FRAMES)
        stack = SerialEMStack(incoming / "grid1.mrc", pixel_size_nm=0.05)
        for frame, _ in itertools.islice(labelled, N_FRAMES):
            stack.append(frame.pixels.astype(np.float32), {"PixelSpacing": frame.pixel_size_nm * 10})

        def done():
            receive()
            frames = sum(m[0] == b"latticewatch.frame" for m in messages)
            errors = sum(m[0] == b"latticewatch.error" for m in messages)
            return frames >= N_FRAMES and errors >= 1

        wait_until(done, 180, "every frame's events")
        # the archive runs behind publication: wait until it wrote every frame
        wait_until(lambda: scrape(metrics_port).get(("latticewatch_archive_frames_total", ())) == N_FRAMES, 60,
                   "the archive")
        receive(300)
        yield {"messages": list(messages), "metrics_port": metrics_port, "state": tmp / "data" / "state", "tmp": tmp}
    finally:
        sub.close(linger=0)
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_every_message_sent_validates_against_its_shipped_schema(daemon):
    validators = {name: jsonschema.Draft202012Validator(load_schema(name), format_checker=jsonschema.FormatChecker())
                  for name in SCHEMAS}
    seen = set()
    for topic, payload in daemon["messages"]:
        name = topic.decode().removeprefix("latticewatch.")
        event = json.loads(payload)
        validators[name].validate(event)
        assert event["type"] == ("particle" if name == "defect" else name)
        seen.add(name)
    assert {"frame", "particle", "error", "status"} <= seen


def test_messages_are_the_durable_log_byte_for_byte_with_deterministic_ids(daemon):
    logged = [line for line in (daemon["state"] / "events.jsonl").read_text().splitlines() if line]
    sent = [payload.decode() for topic, payload in daemon["messages"]
            if topic not in (b"latticewatch.status", b"latticewatch.defect")]
    assert sent == logged  # same bytes, same order, nothing twice
    frames = [json.loads(p) for p in sent if json.loads(p)["type"] == "frame"]
    assert [f["event_id"] for f in frames] == [f"scope:grid1.mrc#{k}/frame" for k in range(N_FRAMES)]
    for f in frames:
        particles = [json.loads(p) for p in sent
                     if json.loads(p).get("frame_id") == f["frame_id"] and json.loads(p)["type"] == "particle"]
        assert [p["event_id"] for p in particles] == [f"{f['frame_id']}/region/{i}" for i in range(f["particles"])]
    defects = [json.loads(p) for t, p in daemon["messages"] if t == b"latticewatch.defect"]
    faults = [json.loads(p) for p in sent if json.loads(p).get("label") == "stacking_fault"]
    assert defects == faults
    errors = [json.loads(p) for t, p in daemon["messages"] if t == b"latticewatch.error"]
    assert [e["event_id"] for e in errors] == ["scope:broken.mrc/error"]


def test_status_events_report_progress(daemon):
    status = [json.loads(p) for t, p in daemon["messages"] if t == b"latticewatch.status"]
    last = status[-1]
    assert last["analysed"] == N_FRAMES and last["quarantined"] == 1
    assert {"prepare", "segment", "finish", "deferred", "archive", "archive_backlog"} <= set(last["backlog"])
    assert last["publisher"]["dropped"] == 0 and any(s["fps"] > 0 for s in status)
    ids = [s["event_id"] for s in status]
    assert len(set(ids)) == len(ids)


def frame_events(daemon):
    return [json.loads(p) for t, p in daemon["messages"] if t == b"latticewatch.frame"]


def expected_defect_fraction(frames):
    """The rolling estimate: the pooled counts corrected with the profile's confusion (carried by each event)."""
    faults = sum(f["class_counts"]["stacking_fault"] for f in frames)
    clean = sum(f["class_counts"]["no_stacking_fault"] for f in frames)
    confusion = frames[0]["defect_confusion"] and DefectConfusion.model_validate(frames[0]["defect_confusion"])
    estimate = estimate_defect_fraction(faults, clean, confusion).estimate
    return math.nan if estimate is None else estimate


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9)


def test_metrics_scraped_over_http_match_what_was_sent(daemon):
    m = scrape(daemon["metrics_port"])
    frames = frame_events(daemon)
    particles = [json.loads(p) for t, p in daemon["messages"] if t == b"latticewatch.particle"]
    assert m[("latticewatch_frames_total", (("outcome", "analysed"), ("source", "scope")))] == N_FRAMES
    assert m[("latticewatch_frames_total", (("outcome", "quarantined"), ("source", "scope")))] == 1
    assert m[("latticewatch_quarantined_frames_total", ())] == 1
    assert m[("latticewatch_frame_latency_seconds_count", ())] == N_FRAMES
    assert m[("latticewatch_frame_latency_seconds_sum", ())] == pytest.approx(
        sum(f["runner"]["latency_s"] for f in frames), rel=1e-6)
    for stage in frames[0]["timings_s"]:
        assert m[("latticewatch_stage_seconds_count", (("stage", stage),))] == N_FRAMES
    by_class = {}
    for p in particles:
        by_class[p["label"]] = by_class.get(p["label"], 0) + 1
    for label, n in by_class.items():
        assert m[("latticewatch_particles_total", (("class", label),))] == n
        assert m[("latticewatch_particle_diameter_nm_count", (("class", label),))] == n
    assert same(m[("latticewatch_defect_fraction_rolling", ())], expected_defect_fraction(frames))
    last = frames[-1]["defect_fraction"]
    assert same(m[("latticewatch_defect_fraction", ())], math.nan if last is None else last)
    assert m[("latticewatch_budget_overruns_total", ())] == sum(f["runner"]["overrun"] for f in frames)
    assert m[("latticewatch_archive_raw_bytes_total", ())] == N_FRAMES * 320 * 320 * 4  # float32 320² frames
    assert m[("latticewatch_archive_compression_ratio", ())] == pytest.approx(
        m[("latticewatch_archive_raw_bytes_total", ())] / m[("latticewatch_archive_stored_bytes_total", ())])
    assert m[("latticewatch_queue_depth", (("queue", "prepare"),))] == 0
    assert m[("latticewatch_events_sent_total", ())] >= len(daemon["messages"])
    assert m[("latticewatch_events_dropped_total", ())] == 0
    info = [k for k in m if k[0] == "latticewatch_build_info"]
    assert info and dict(info[0][1])["profile"] == "nanoparticles"


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not installed (Debian: apt-get install -y prometheus)")
def test_a_real_prometheus_scrapes_the_daemon_and_answers_promql_about_defect_fraction(daemon, tmp_path):
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: latticewatch\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon['metrics_port']}']\n")
    prom = subprocess.Popen([shutil.which("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))

    def query(promql):
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=5).read())
        except OSError:
            return None
        assert body["status"] == "success"
        return body["data"]["result"]

    try:
        expected = expected_defect_fraction(frame_events(daemon))
        assert 0 < expected < 1  # the frames hold faulted and clean particles: a real number to ask about
        result = wait_until(lambda: query('latticewatch_defect_fraction_rolling{job="latticewatch"}'), 60,
                            "Prometheus's first scrape")
        assert float(result[0]["value"][1]) == pytest.approx(expected, rel=1e-9)
        analysed = wait_until(lambda: query('sum(latticewatch_frames_total{outcome="analysed"})'), 30, "frames")
        assert float(analysed[0]["value"][1]) == N_FRAMES
    finally:
        prom.terminate()
        prom.wait(30)


def test_events_command_replays_the_log_since_an_id_a_time_and_by_topic(daemon, capsys):
    from latticewatch.cli import main

    state = str(daemon["state"])
    logged = [line for line in (daemon["state"] / "events.jsonl").read_text().splitlines() if line]
    events = [json.loads(line) for line in logged]
    third = next(i for i, e in enumerate(events) if e["event_id"] == "scope:grid1.mrc#2/frame")

    assert main(["events", "--state", state, "--since", "scope:grid1.mrc#2/frame"]) == 0
    assert capsys.readouterr().out.splitlines() == logged[third + 1:]

    assert main(["events", "--state", state, "--since", events[third]["at"], "--topic", "latticewatch.frame"]) == 0
    out = [json.loads(line)["event_id"] for line in capsys.readouterr().out.splitlines()]
    assert out[0] == "scope:grid1.mrc#2/frame" and all(i.endswith("/frame") for i in out)

    assert main(["events", "--state", state, "--topic", "defect", "--topic", "error"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(e["type"] == "error" or e["label"] == "stacking_fault" for e in out)
    assert any(e["type"] == "error" for e in out)

    assert main(["events", "--state", state, "--since", "no-such/event"]) == 1
    assert "no event with id 'no-such/event'" in capsys.readouterr().err


def test_a_stalled_subscriber_never_slows_publishing_and_drops_are_counted():
    from latticewatch.sinks.events import ParticleEvent, error_event, now
    from latticewatch.sinks.publisher import EventPublisher

    ctx = zmq.Context()
    pub = EventPublisher("tcp://127.0.0.1:0", high_water_mark=10, status_interval_s=0, context=ctx)
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(pub.address)
    wait_until(lambda: (pub.consume([error_event("probe", "", "probe")]), stalled.poll(10))[1], 10, "the subscription")
    fault = ParticleEvent(event_id="m:0/region/0", at=now(), frame_id="m:0", region_id=0, bbox=(0, 0, 2, 2),
                          centroid_px=(1.0, 1.0), centroid_nm=None, area_px=4, area_nm2=None,
                          equivalent_diameter_nm=None, eccentricity=0.0, solidity=1.0, touches_edge=False,
                          agglomerate_suspect=False, features={f"pad{i}": 0.0 for i in range(70)},
                          label="stacking_fault", probabilities={})
    assert len(fault.rendered()) > 1000
    start = time.perf_counter()
    for _ in range(5000):
        pub.consume([fault])  # never read by the subscriber
    elapsed = time.perf_counter() - start
    assert elapsed < 5  # 10 000 sends (particle + defect) without waiting for anyone
    # TCP buffers absorb a load-dependent share (~1–2 k of these 1 kB messages); the rest must be dropped
    assert pub.counters["dropped"] > 5000 and pub.counters["sent"] + pub.counters["dropped"] >= 10000
    pub.close()
    stalled.close(linger=0)
    ctx.term()
