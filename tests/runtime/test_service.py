"""The daemon as a systemd service: sd_notify (READY, WATCHDOG cadence, STATUS, STOPPING), /healthz and /readyz, and
a hung pipeline whose watchdog pings stop — against a real notification socket, the way systemd listens."""

import ctypes
import json
import signal
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest
from servicekit import NotifyListener, logged_events, problems_in, start_daemon, write_config, write_frame

from latticewatch.config import load_config
from latticewatch.runtime.daemon import Daemon
from latticewatch.runtime.notify import Notifier
from latticewatch.sinks.events import FrameEvent
from waiting import wait_until

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def deny_write_execute() -> None:
    """In the child before exec: the kernel's MemoryDenyWriteExecute (Linux >= 6.3; kept across exec)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)


def mdwe_supported() -> bool:
    import subprocess
    import sys

    probe = "import ctypes, mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"
    return subprocess.run([sys.executable, "-c", probe], preexec_fn=deny_write_execute,
                          capture_output=True).returncode != 0


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_notify_protocol_health_endpoints_under_memory_deny_write_execute(tmp_path, profile_dir, synthetic_images):
    """READY only once sources, models and outputs are up; WATCHDOG=1 at half of WATCHDOG_USEC; STATUS with the
    last frame; STOPPING=1 on SIGTERM, exit 0. HTTP answers only once the state exists. The daemon runs under the
    kernel's MemoryDenyWriteExecute when the kernel has it (the unit sets MemoryDenyWriteExecute=yes)."""
    config = write_config(tmp_path / "lw.toml", profile_dir)
    port = load_config(config).dashboard.port
    ledger = tmp_path / "data" / "state" / "ledger.sqlite"
    first_answer: dict[str, object] = {}

    def probe_http() -> None:  # from before the start: the first answer must find the state in place
        while not first_answer:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            first_answer.update(ledger_exists=ledger.exists(), readyz=get(f"http://127.0.0.1:{port}/readyz"))

    listener = NotifyListener(str(tmp_path / "notify"))
    threading.Thread(target=probe_http, daemon=True).start()
    mdwe = mdwe_supported()
    daemon = start_daemon(config, tmp_path / "err.log", notify=listener.address, watchdog_usec=1_000_000,
                          preexec_fn=deny_write_execute if mdwe else None)
    try:
        listener.wait_for("READY", 90)
        ready_at = listener.times("READY")[0]
        wait_until(lambda: first_answer, 10, "the dashboard's first answer")
        assert first_answer["ledger_exists"], "HTTP answered before the ledger existed"
        status, body = first_answer["readyz"]
        assert status == 200 and json.loads(body) == {"ready": True, "checks": {"sources": "ok", "models": "ok",
                                                                               "ledger": "ok"}}
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, b"ok\n")

        for k in range(3):
            write_frame(tmp_path / "incoming", f"f{k}.mrc", synthetic_images[k])
        events = tmp_path / "data" / "state" / "events.jsonl"
        wait_until(lambda: sum(e["type"] == "frame" for e in logged_events(events)) == 3, 60, "3 frames analysed")
        wait_until(lambda: any("last frame scope:f" in s for s in listener.values("STATUS")), 10, "a STATUS line")
        time.sleep(3.0)  # watchdog pings to measure
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, (tmp_path / "err.log").read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    listener.wait_for("STOPPING", 5)
    listener.close()

    pings = [t for t in listener.times("WATCHDOG") if t > ready_at]
    gaps = [b - a for a, b in zip([ready_at, *pings], pings)]
    assert len(pings) >= 6, gaps
    assert 0.35 < statistics.median(gaps) < 0.75, gaps  # half of the 1 s watchdog
    assert max(gaps) < 1.0, gaps  # never as late as the deadline itself
    assert listener.times("STOPPING")[0] >= pings[-1]
    assert all(v == "1" for v in listener.values("WATCHDOG"))
    statuses = listener.values("STATUS")
    assert any(s.startswith("analysed 3 (") and "backlog 0" in s for s in statuses), statuses
    log_text = (tmp_path / "err.log").read_text()
    assert not problems_in(log_text), log_text[-3000:]


def test_abstract_notify_socket_and_the_environment(tmp_path):
    name = f"@latticewatch-test-{time.monotonic_ns()}"
    listener = NotifyListener(name)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
        assert notifier.ping_interval_s is None  # the watchdog is some other process's
        notifier = Notifier.from_env({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"})
        assert notifier.ping_interval_s == 2.0
        assert notifier.notify(READY=1, STATUS="two\nlines")
        listener.wait_for("READY", 5)
        assert listener.values("STATUS") == ["two lines"]  # one message, one line per field
    finally:
        listener.close()
    assert Notifier.from_env({}) is None
    assert not Notifier(str(tmp_path / "nobody-listens")).notify(WATCHDOG=1)  # logged, never raised


class StuckSink:
    """A sink that blocks on the first frame until released: the finish phase hangs on one frame."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def consume(self, events) -> None:
        if any(isinstance(e, FrameEvent) for e in events) and not self.release.is_set():
            self.entered.set()
            self.release.wait(60)


def test_a_hung_pipeline_stops_the_watchdog_pings_and_a_recovered_one_resumes_them(tmp_path, profile_dir,
                                                                                   synthetic_images):
    config = load_config(write_config(tmp_path / "lw.toml", profile_dir, events="enabled = false",
                                      metrics="enabled = false", dashboard="enabled = false"))
    listener = NotifyListener(str(tmp_path / "notify"))
    stuck = StuckSink()
    stop = threading.Event()
    daemon = Daemon(config, stop, sinks=[stuck], notifier=Notifier(listener.address, watchdog_s=0.4), hung_after_s=1.0)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        listener.wait_for("READY", 90)
        assert daemon.readiness()[0]
        write_frame(tmp_path / "incoming", "a.mrc", synthetic_images[0])
        assert stuck.entered.wait(60)
        wait_until(lambda: any(s.startswith("hung: finish for") for s in listener.values("STATUS")), 10,
                   "the hang reported")
        hung_at = time.monotonic()
        time.sleep(1.5)  # several ping intervals (0.2 s) without a ping
        assert not [t for t in listener.times("WATCHDOG") if t > hung_at]
        stuck.release.set()
        wait_until(lambda: [t for t in listener.times("WATCHDOG") if t > hung_at], 10, "pings again")
    finally:
        stuck.release.set()
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    assert daemon.readiness() == (False, {"daemon": "stopping"})
    listener.wait_for("STOPPING", 5)
    listener.close()


def test_dashboard_binds_at_once_but_answers_only_once_served():
    from latticewatch.sinks.dashboard import DashboardSink

    sink = DashboardSink(port=0, serve=False)
    try:
        with pytest.raises(OSError):  # bound, not listening: refused, not answered
            socket.create_connection(("127.0.0.1", sink.server.server_address[1]), timeout=2)
        sink.serve(lambda: (False, {"ledger": "the state directory takes no writes"}))
        status, body = get(sink.url + "/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "checks": {"ledger": "the state directory takes no writes"}}
    finally:
        sink.close()
