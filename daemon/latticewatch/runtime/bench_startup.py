"""``latticewatch bench --startup``: cold-start wall times of ``process`` and of the daemon, each in fresh
interpreters, beside a bare ``python -c pass`` for scale."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Goals of a cold start (issue 13): ``process`` of one frame, and the daemon ready for frames.
STARTUP_GOALS_S = {"process": 2.0, "daemon_ready": 3.0}
#: The daemon's log line once its pipeline and outputs are up (`runtime.daemon.run_daemon`, at INFO).
DAEMON_READY_LINE = "latticewatch daemon: profile"


def startup_frame(path: Path, side: int = 512) -> Path:
    """Write a synthetic ``side``² uint16 MRC frame at the model's usual 0.05 nm/px (the startup bench's input)."""
    import mrcfile

    from latticewatch.testing.synthetic.frames import generate_frame

    sample = generate_frame(np.random.default_rng(0), shape=(side, side), pixel_size_nm=0.05)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(sample.image.astype(np.uint16))
        mrc.voxel_size = 0.5  # Å
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon_ready_s(folder: Path, profile: str, timeout_s: float) -> float | str:
    """Seconds from starting ``latticewatch run`` until it logs that it is ready; a string says why it failed."""
    import signal
    import subprocess
    import sys
    import threading

    (folder / "incoming").mkdir(parents=True)
    config = folder / "latticewatch.toml"
    quoted = json.dumps  # a JSON string is a TOML basic string
    config.write_text(f"profile = {quoted(profile)}\ndata_dir = {quoted(str(folder / 'data'))}\n"
                      f"[events]\naddress = 'tcp://127.0.0.1:{_free_port()}'\n[metrics]\nport = {_free_port()}\n"
                      f"[dashboard]\nport = 0\n[sources.incoming]\nkind = 'folder'\n"
                      f"path = {quoted(str(folder / 'incoming'))}\n")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "latticewatch", "-v", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            if DAEMON_READY_LINE in line:
                return time.perf_counter() - start
        return f"the daemon exited with code {proc.wait()} before it was ready"
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.stderr.close()
        proc.wait()


def run_startup_bench(profile: str = "nanoparticles", *, file: Path | None = None, repeats: int = 5,
                      daemon: bool = True, timeout_s: float = 120.0) -> dict[str, Any]:
    """Cold-start wall times: ``latticewatch process FILE`` on one frame and ``latticewatch run`` until ready,
    each in ``repeats`` fresh interpreters (medians), beside a bare ``python -c pass`` for scale.

    Without ``file`` a synthetic 512² MRC frame is used. A run that fails or times out is listed in
    ``failures`` and left out of the medians.

    Examples
    --------
    >>> results = run_startup_bench(repeats=3)  # doctest: +SKIP
    >>> results["process"]["median_s"] <= results["goals_s"]["process"]  # doctest: +SKIP
    True
    """
    import subprocess
    import sys
    import tempfile

    def wall(command: list[str]) -> float | str:
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:g} s"
        seconds = time.perf_counter() - start
        return seconds if done.returncode == 0 else f"exit code {done.returncode}: {done.stderr.strip()[-500:]}"

    failures: list[dict[str, str]] = []

    def summary(name: str, runs: list[float | str]) -> dict[str, Any]:
        failures.extend({"measurement": name, "problem": r} for r in runs if isinstance(r, str))
        seconds = [r for r in runs if not isinstance(r, str)]
        return {"runs_s": seconds, "median_s": statistics.median(seconds) if seconds else None}

    with tempfile.TemporaryDirectory(prefix="latticewatch-startup-") as tmp:
        root = Path(tmp)
        path = Path(file) if file is not None else startup_frame(root / "frame.mrc")
        process = [sys.executable, "-m", "latticewatch", "process", str(path), "--profile", profile, "--out"]
        results: dict[str, Any] = {
            "profile": profile, "file": str(path) if file is not None else "synthetic 512² uint16 MRC",
            "python": sys.executable, "repeats": repeats, "goals_s": STARTUP_GOALS_S,
            "interpreter": summary("interpreter", [wall([sys.executable, "-c", "pass"]) for _ in range(repeats)]),
            "process": summary("process", [wall([*process, str(root / f"out{i}")]) for i in range(repeats)]),
        }
        if daemon:
            results["daemon_ready"] = summary(
                "daemon_ready", [_daemon_ready_s(root / f"daemon{i}", profile, timeout_s) for i in range(repeats)])
    results["failures"] = failures
    return results


def format_startup(results: dict[str, Any]) -> str:
    """One line per measurement: median, runs and goal."""
    lines = []
    for name in ("interpreter", "process", "daemon_ready"):
        if name not in results or results[name]["median_s"] is None:
            continue
        entry, goal = results[name], results["goals_s"].get(name)
        runs = ", ".join(f"{s:.2f}" for s in entry["runs_s"])
        lines.append(f"{name}: median {entry['median_s']:.2f} s ({runs})" + (f"; goal ≤ {goal:g} s" if goal else ""))
    lines += [f"failed: {f['measurement']}: {f['problem']}" for f in results["failures"]]
    return "\n".join(lines)
