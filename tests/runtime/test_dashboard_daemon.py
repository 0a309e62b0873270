"""The live dashboard end to end: a real daemon process fed by the replay emulator, the verdict API over
real HTTP, and the page driven by a real headless Chromium (Debian ``chromium``)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from latticewatch.frame import Analysis, Frame, Region
from latticewatch.sinks.dashboard import DashboardSink
from latticewatch.sinks.events import RunnerInfo, frame_events
from latticewatch.stages.defect_fraction import DefectConfusion
from latticewatch.testing.replay import replay, source_frames
from waiting import wait_until

N_FRAMES = 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def wait_for_dashboard(predicate, timeout, what):
    """`wait_until` on a server that may not answer yet, or a file caught mid-write: both mean "not yet"."""
    return wait_until(predicate, timeout, what, ignore=(OSError, ValueError), interval=0.2)


@pytest.fixture
def daemon(tmp_path):
    """`latticewatch run` in a subprocess with the dashboard on a free port; yields (url, incoming, replay_more).

    It runs the shipped nanoparticle profile, so particles are found and every chart has data.
    """
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    port = free_port()
    config = tmp_path / "lw.toml"
    config.write_text(
        f'profile = "nanoparticles"\ndata_dir = "data"\n[runtime]\nthreads = 1\n[archive]\nenabled = false\n'
        f'[events]\nenabled = false\n[metrics]\nenabled = false\n'
        f'[dashboard]\nport = {port}\nmax_rate_hz = 10\nverdict_min_particles = 1000000\n'
        'verdict_file = "lw_verdict.json"\n'
        f'[sources.scope]\nkind = "folder"\npath = "incoming"\nsettle_s = 0.3\n'
    )
    log = open(tmp_path / "daemon.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def feed(n, seed, stack):
        replay(source_frames(f"synthetic:{n}", shape=(256, 256), pixel_size_nm=0.05, seed=seed), rate_hz=4,
               to_folder=incoming, serialem_stack=stack)

    try:
        wait_for_dashboard(lambda: urllib.request.urlopen(url + "/healthz", timeout=2).status == 200, 60,
                           "the dashboard to listen")
        yield url, incoming, feed
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print((tmp_path / "daemon.log").read_text()[-3000:])


def test_verdict_api_and_state_over_http_from_a_running_daemon(daemon):
    url, incoming, feed = daemon
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/api/verdict/latest", timeout=5)
    assert err.value.code == 503 and json.load(err.value)["verdict"] is None
    (incoming / "broken.mrc").write_bytes(b"MRC? no." * 200)
    feed(N_FRAMES, 0, "grid1.mrc")
    wait_for_dashboard(lambda: get_json(url + "/api/state")["totals"]["frames"] >= N_FRAMES, 120,
                       "every frame on the dashboard")
    verdict = get_json(url + "/api/verdict/latest")
    assert set(verdict) >= {"frame_id", "particle_count", "coverage", "defect_fraction", "verdict", "rule"}
    assert verdict["frame_id"].endswith(f"grid1.mrc#{N_FRAMES - 1}")
    assert verdict["verdict"] == "skip" and "particle_count < 1000000" in verdict["rule"]  # the configured rule
    def verdict_file_id():
        return json.loads((incoming / "lw_verdict.json").read_text())["frame_id"]

    wait_for_dashboard(lambda: verdict_file_id() == verdict["frame_id"], 30, "the verdict file next to the stack")
    state = get_json(url + "/api/state")
    assert len(state["series"]) == N_FRAMES
    wait_for_dashboard(lambda: get_json(url + "/api/state")["totals"]["errors"] >= 1, 30,
                       "the broken file among the recent errors")
    errors = get_json(url + "/api/state")["errors"]
    assert any("broken.mrc" in (e["frame_id"] or "") for e in errors)
    wait_for_dashboard(lambda: get_json(url + "/api/state")["latency"]["p50_s"] is not None, 30, "runner latencies")
    with urllib.request.urlopen(url + "/thumbnail.png", timeout=5) as r:
        assert r.headers["Content-Type"] == "image/png" and r.read(8) == b"\x89PNG\r\n\x1a\n"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path, *args, timeout=90):
    profile = tmp_path / f"chromium-profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)


def dump_dom(tmp_path, url):
    result = chromium(tmp_path, "--virtual-time-budget=3000", "--dump-dom", url + "?sse_max_s=1")
    assert "<svg" in result.stdout, result.stderr[-2000:]
    return result.stdout


def attr(dom, element_id, name):
    # element_id "" is <body>
    tag = re.search(rf'<[^>]*\bid="{element_id}"[^>]*>', dom) if element_id else re.search(r"<body[^>]*>", dom)
    assert tag, f"no #{element_id} in the page"
    value = re.search(rf'\b{name}="([^"]*)"', tag.group(0))
    return value.group(1) if value else None


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium_shows_data_and_the_thumbnail_updates(daemon, tmp_path):
    import html

    url, incoming, feed = daemon
    dom = dump_dom(tmp_path, url + "/")
    assert attr(dom, "chart-defect", "data-points") == "0"  # nothing analysed yet: the page says so
    feed(N_FRAMES, 0, "grid1.mrc")
    wait_for_dashboard(lambda: get_json(url + "/api/state")["thumbnail"]["version"] >= 1
                       and get_json(url + "/api/state")["totals"]["frames"] >= N_FRAMES, 120, "the first frames")
    dom = dump_dom(tmp_path, url + "/")
    assert int(attr(dom, "chart-defect", "data-points")) >= N_FRAMES
    counts = json.loads(html.unescape(attr(dom, "chart-classes", "data-counts")))
    state = get_json(url + "/api/state")
    assert counts == state["class_totals"] and sum(counts.values()) > 0
    assert int(attr(dom, "chart-sizes", "data-points")) > 0  # size distribution drawn
    assert int(attr(dom, "chart-latency", "data-points")) >= 1
    # the rolling defect fraction's 95 % band covers every frame that has one
    banded = sum(s["rolling_interval"]["lower"] is not None for s in state["series"])
    assert int(attr(dom, "chart-defect", "data-band-points")) == banded
    first_thumb = attr(dom, "thumb", "src")
    assert first_thumb and first_thumb.startswith("thumbnail.png?v=")
    assert attr(dom, "thumb", "data-frame").endswith(f"#{N_FRAMES - 1}") or int(attr(dom, "thumb", "data-version")) >= 1
    assert 'data-frames="' in dom
    assert int(attr(dom, "", "data-sse-messages") or 0) >= 1  # snapshots also came over server-sent events

    feed(3, 1, "grid2.mrc")  # more frames: the thumbnail must move on
    wait_for_dashboard(lambda: get_json(url + "/api/state")["thumbnail"]["frame_id"].endswith("grid2.mrc#2"), 120,
                       "the new frames")
    dom = dump_dom(tmp_path, url + "/")
    assert attr(dom, "thumb", "src") != first_thumb
    assert attr(dom, "thumb", "data-frame").endswith("grid2.mrc#2")
    assert int(attr(dom, "chart-defect", "data-points")) >= N_FRAMES + 3

    shot = Path(os.environ.get("LATTICEWATCH_DASHBOARD_SHOT", tmp_path / "dashboard.png"))
    result = chromium(tmp_path, "--virtual-time-budget=3000", "--hide-scrollbars", "--window-size=1280,900",
                      f"--screenshot={shot}", url + "/?sse_max_s=1")
    assert shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_page_draws_the_rolling_defect_fraction_inside_its_shaded_95_percent_band(tmp_path):
    """The dashboard sink alone, fed frames with known counts: the band is drawn, the line runs inside it."""
    confusion = DefectConfusion(true_stacking_fault=(85, 15), true_no_stacking_fault=(10, 90))
    runner = RunnerInfo(phases_s={}, latency_s=0.1, budget_ms=None, overrun=False)
    sink = DashboardSink(port=0, max_rate_hz=20)
    try:
        for k in range(8):
            labels = ["stacking_fault"] * (k % 3 + 1) + ["no_stacking_fault"] * 4 + ["uncertain"]
            regions = tuple(Region(i, (0, 0, 4, 4), (2.0, 2.0), None, 12, 2.0, 1.6, 0.1, 0.9, False, False, {}, lab)
                            for i, lab in enumerate(labels))
            frame = Frame(f"cam:{k}", np.random.default_rng(k).normal(size=(64, 64)).astype(np.float32), 0.05)
            analysis = Analysis(frame.frame_id, np.zeros((64, 64), np.uint8), regions, {}, {}, "test", 0.05, 0.9,
                                defect_confusion=confusion)
            sink.consume(frame_events(frame, analysis, runner))
        wait_for_dashboard(lambda: get_json(sink.url + "/api/state")["totals"]["frames"] == 8, 10, "the frames")
        dom = dump_dom(tmp_path, sink.url + "/")
    finally:
        sink.close()
    assert attr(dom, "chart-defect", "data-band-points") == "8"
    chart = re.search(r'<svg[^>]*id="chart-defect".*?</svg>', dom, re.S).group(0)
    band = re.search(r'<polygon[^>]*class="band"[^>]*>', chart).group(0)
    ys = [float(p.split(",")[1]) for p in re.search(r'points="([^"]*)"', band).group(1).split()]
    line = re.search(r'<path d="(M[^"]*)"[^>]*stroke="#f5f5f5"', chart).group(1)
    line_ys = [float(p.split(",")[1]) for p in re.split("[ML]", line) if p]
    upper, lower = ys[:8], ys[8:][::-1]  # SVG y grows downwards: the upper bound has the smaller y
    assert all(u <= y <= lo for u, y, lo in zip(upper, line_ys, lower)) and any(u < lo for u, lo in zip(upper, lower))
