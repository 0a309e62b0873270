"""``latticewatch bench``: per-stage medians of the pipeline on synthetic frames, and a naive
reference pipeline (the seed's approach) timed on the same frames in the same run.

The pipeline's frames go through the batch path (`latticewatch.runtime.batch`) exactly as
``process`` runs them, so a frame the analyser refuses is a reported failure, not a traceback.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.frame import Analysis, Frame
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.batch import Batch, Failure

#: Camera sampling of the benchmark frames: finer than the model's, as on a 4k camera at HRTEM
#: magnification, so the pipeline resamples exactly as it would in production.
BENCH_PIXEL_SIZE_NM = 0.025


def synthetic_frame(side: int, seed: int = 0) -> Frame:
    from latticewatch.testing.synthetic.frames import generate_frame

    sample = generate_frame(np.random.default_rng(seed), shape=(side, side), pixel_size_nm=BENCH_PIXEL_SIZE_NM)
    return Frame(f"synthetic:{side}", sample.image, BENCH_PIXEL_SIZE_NM, origin="bench")


class NaivePipeline:
    """What the published seed pipeline does, step by step: scipy's median filter, divide by the
    maximum, eager fp32 torch on each 512² tile with a softmax, skimage morphology and regionprops,
    then per particle a Python loop over FFT radii and a scikit-learn forest call."""

    def __init__(self, directory: Path, manifest):
        import torch
        from safetensors.torch import load_file

        from latticewatch.models.architectures import build_net
        from latticewatch.stages.classify import load_forest

        self.torch = torch
        self.net = build_net(manifest.segmentation.architecture, manifest.segmentation.widths)
        self.net.load_state_dict(load_file(str(directory / manifest.segmentation.weights)))
        self.net.eval()
        clf = manifest.classifier  # the seed had the forest; a CNN profile's naive run classifies nothing
        self.forest = load_forest(directory / clf.skops) if clf and clf.kind == "forest" and clf.skops else None
        self.threshold = manifest.segmentation.threshold
        # the seed pipeline works at the camera's sampling: the same radii in nm are more pixels
        self.open_px = round(manifest.isolation.opening_radius_nm / BENCH_PIXEL_SIZE_NM)
        self.close_px = round(manifest.isolation.closing_radius_nm / BENCH_PIXEL_SIZE_NM)

    def __call__(self, pixels: np.ndarray) -> int:
        from scipy import ndimage
        from skimage import measure, morphology

        image = ndimage.median_filter(pixels, 3).astype(np.float32)
        image /= image.max()
        prob = np.zeros_like(image)
        with self.torch.no_grad():
            for r in range(0, image.shape[0], 512):
                for c in range(0, image.shape[1], 512):
                    tile = self.torch.from_numpy(np.ascontiguousarray(image[r : r + 512, c : c + 512]))[None, None]
                    prob[r : r + 512, c : c + 512] = self.net(tile)[0, 1].numpy()
        mask = morphology.closing(morphology.opening(prob > self.threshold, morphology.disk(self.open_px)),
                                  morphology.disk(self.close_px))
        labels = measure.label(mask)
        n = 0
        for region in measure.regionprops(labels, intensity_image=image):
            crop = np.where(region.image, region.image_intensity - region.intensity_mean, 0)
            power = np.abs(np.fft.fftshift(np.fft.fft2(crop, s=(256, 256)))) ** 2
            yy, xx = np.indices(power.shape)
            radius = np.hypot(yy - 128, xx - 128).astype(int)
            profile = [power[radius == k].mean() for k in range(128)]
            com = sum(k * p for k, p in enumerate(profile)) / sum(profile)
            feats = [[np.mean(profile), np.std(profile), com, region.intensity_mean,
                      float(np.std(region.image_intensity[region.image]))]]
            if self.forest is not None:
                self.forest.predict_proba(feats)
            n += 1
        return n


def timed_analyses(analyser: Analyser, frame: Frame, repeats: int, batch: Batch) -> list[tuple[float, Analysis]]:
    """``repeats`` timed analyses of ``frame`` on the batch path, after one untimed warm-up
    (session allocation for this shape); empty when the analyser refuses the frame."""

    def timed(f: Frame) -> tuple[float, Analysis]:
        start = time.perf_counter()
        analysis = analyser.analyse(f)
        return time.perf_counter() - start, analysis

    if not list(batch.analyse([frame], analyser.analyse)):  # the warm-up; a refused frame fails once
        return []
    return [result for _, result in batch.analyse(itertools.repeat(frame, repeats), timed)]


def run_pipeline_bench(
    profile: str = "nanoparticles",
    *,
    sizes: tuple[int, ...] = (1024, 4096),
    repeats: int = 7,
    naive: bool = True,
    threads: int | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> dict[str, Any]:
    """Medians (seconds) per stage and end to end for each frame side, plus the naive pipeline.

    A size the analyser refuses is left out of ``sizes`` and listed in ``failures`` (and passed to
    ``on_failure`` as it happens).

    Examples
    --------
    >>> results = run_pipeline_bench(sizes=(1024,), repeats=3, naive=False)  # doctest: +SKIP
    >>> round(results["sizes"]["1024"]["median_s"], 2), results["failures"]  # doctest: +SKIP
    (0.21, [])
    """
    analyser = Analyser(profile, threads=threads)
    batch = Batch(on_failure=on_failure)
    naive_pipeline, naive_note = None, None
    if naive:
        try:
            naive_pipeline = NaivePipeline(analyser.directory, analyser.manifest)
        except ImportError as err:
            naive_note = f"naive pipeline skipped: {err} (install the [train] extra for torch)"
    results: dict[str, Any] = {"profile": analyser.model_ids, "frame_pixel_size_nm": BENCH_PIXEL_SIZE_NM,
                               "model_pixel_size_nm": analyser.manifest.segmentation.pixel_size_nm, "repeats": repeats,
                               "sizes": {}}
    if naive_note:
        results["note"] = naive_note
    for side in sizes:
        frame = synthetic_frame(side)
        runs = timed_analyses(analyser, frame, repeats, batch)
        if not runs:
            continue
        stage_runs: dict[str, list[float]] = {}
        for _, analysis in runs:
            for stage, seconds in analysis.timings_s.items():
                stage_runs.setdefault(stage, []).append(seconds)
        totals = [seconds for seconds, _ in runs]
        entry = {
            "dtype": str(frame.pixels.dtype),
            "particles": len(analysis.regions),
            "median_s": statistics.median(totals),
            "stage_median_s": {k: statistics.median(v) for k, v in stage_runs.items()},
        }
        if naive_pipeline is not None:
            naive_pipeline(frame.pixels)
            naive_times = []
            for _ in range(max(1, repeats // 2 if side > 2048 else repeats)):
                start = time.perf_counter()
                naive_pipeline(frame.pixels)
                naive_times.append(time.perf_counter() - start)
            entry["naive_median_s"] = statistics.median(naive_times)
            entry["speedup_vs_naive"] = entry["naive_median_s"] / entry["median_s"]
        results["sizes"][str(side)] = entry
    results["failures"] = [f.as_dict() for f in batch.failures]
    return results


def format_results(results: dict[str, Any]) -> str:
    """One human-readable line per frame size."""
    lines = []
    for side, entry in results["sizes"].items():
        stages = ", ".join(f"{k} {1000 * v:.1f}" for k, v in entry["stage_median_s"].items())
        line = f"{side}²: end to end {1000 * entry['median_s']:.1f} ms median ({stages} ms)"
        if "naive_median_s" in entry:
            line += f"; naive {1000 * entry['naive_median_s']:.0f} ms → {entry['speedup_vs_naive']:.1f}× faster"
        lines.append(line)
    if "note" in results:
        lines.append(results["note"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------ cold start

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
