"""``latticewatch bench``: per-stage median and p99 of the pipeline on synthetic frames for one or more
backends, frames/s through the daemon's pipelined runner, and the naive seed pipeline timed in the
same run at the camera's sampling and at the model's.

The timed analyses go through the batch path (`latticewatch.runtime.batch`) exactly as ``process``
runs them, so a frame the analyser refuses is a reported failure, not a traceback. The throughput
runs are `latticewatch.runtime.bench_pipelined`; the cold start is `latticewatch.runtime.bench_startup`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.errors import ModelError
from latticewatch.frame import Analysis, Frame
from latticewatch.models.backends import ACCELERATORS, cpu_device, cpu_threads, resolve, unavailable
from latticewatch.runtime.analyser import Analyser
from latticewatch.runtime.batch import Batch, Failure
from latticewatch.runtime.bench_pipelined import pipelined_frames, run_pipelined, summary
from latticewatch.stages.preprocess import normalise, pad_to_multiple, resample

log = logging.getLogger(__name__)

#: Camera sampling of the benchmark frames: finer than the model's, as on a 4k camera at HRTEM
#: magnification, so the pipeline resamples exactly as it would in production.
BENCH_PIXEL_SIZE_NM = 0.025

#: How every p99 in the results is taken (said in the JSON too).
P99_NOTE = "p99 is the nearest-rank 99th percentile: with fewer than 100 runs it is the slowest run"

#: Issue 15's goals. ``on``: ``gpu`` for the accelerator kinds (`ACCELERATORS`), ``cpu`` for the others;
#: ``field``: a path into a size entry of a backend; ``sizes`` None: every size.
GOALS: dict[str, dict[str, Any]] = {
    "cpu_1024_median_s": {"on": "cpu", "sizes": [1024], "field": "median_s", "at_most": 0.060},
    "cpu_4096_median_s": {"on": "cpu", "sizes": [4096], "field": "median_s", "at_most": 0.7},
    "cpu_speedup_vs_naive_model": {"on": "cpu", "sizes": None, "field": "speedup_vs_naive_model", "at_least": 3.0},
    "gpu_4096_frames_per_s": {"on": "gpu", "sizes": [4096], "field": "pipelined.frames_per_s", "at_least": 40.0},
    "gpu_4096_latency_p99_s": {"on": "gpu", "sizes": [4096], "field": "paced.latency_p99_s", "at_most": 0.1},
    "gpu_4096_segment_median_s": {"on": "gpu", "sizes": [4096], "field": "stages.segment.median_s", "at_most": 0.003},
}


def synthetic_frame(side: int, seed: int = 0) -> Frame:
    """A synthetic ``side``² uint16 frame at `BENCH_PIXEL_SIZE_NM` (the bench's input)."""
    from latticewatch.testing.synthetic.frames import generate_frame

    sample = generate_frame(np.random.default_rng(seed), shape=(side, side), pixel_size_nm=BENCH_PIXEL_SIZE_NM)
    return Frame(f"synthetic:{side}", sample.image, BENCH_PIXEL_SIZE_NM, origin="bench")


def machine(threads: int | None) -> dict[str, Any]:
    """The host: processor, cores, the threads the backends are given, and the load average now."""
    used = cpu_threads(threads)
    return {"cpu": cpu_device(used), "platform": platform.platform(), "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)), "threads": used,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


class NaivePipeline:
    """What the published seed pipeline does, step by step: scipy's median filter, divide by the
    maximum (the network gets the profile's normalisation), eager fp32 torch on each 512² tile with a
    softmax, skimage morphology and regionprops, then per particle a Python loop over FFT radii and a
    scikit-learn forest call (the profile's forest, or its baseline forest beside a CNN).

    It works at the camera's sampling, as the published notebooks do; `at_sampling` gives the same
    pipeline on frames first resampled to another pixel size (the model's: the pixels ours sees).
    """

    def __init__(self, directory: Path, manifest, frame_pixel_size_nm: float = BENCH_PIXEL_SIZE_NM):
        import torch
        from safetensors.torch import load_file

        from latticewatch.models.architectures import build_net
        from latticewatch.stages.classify import load_forest

        self.torch = torch
        self.net = build_net(manifest.segmentation.architecture, manifest.segmentation.widths)
        self.net.load_state_dict(load_file(str(directory / manifest.segmentation.weights)))
        self.net.eval()
        # the seed had the forest: a CNN profile's naive run uses the forest kept beside it, if any
        clf = manifest.classifier if manifest.classifier and manifest.classifier.kind == "forest" \
            else manifest.baseline_classifier
        self.forest = load_forest(directory / clf.skops) if clf and clf.kind == "forest" and clf.skops else None
        self.normalisation = manifest.segmentation.normalisation
        self.threshold = manifest.segmentation.threshold
        self.divisor = manifest.segmentation.divisor
        self.isolation = manifest.isolation
        self.frame_pixel_size_nm = frame_pixel_size_nm
        self._sample(frame_pixel_size_nm)

    def _sample(self, pixel_size_nm: float) -> None:
        self.pixel_size_nm = pixel_size_nm
        # the same radii in nm are more pixels at a finer sampling
        self.open_px = round(self.isolation.opening_radius_nm / pixel_size_nm)
        self.close_px = round(self.isolation.closing_radius_nm / pixel_size_nm)

    def at_sampling(self, pixel_size_nm: float) -> NaivePipeline:
        """The same pipeline (sharing the loaded network) on frames resampled to ``pixel_size_nm`` first,
        with the analyser's own resampling (`latticewatch.stages.preprocess.resample`)."""
        other = copy.copy(self)
        other._sample(pixel_size_nm)
        return other

    @property
    def device(self) -> str:
        return f"CPU, eager fp32 torch ({self.torch.get_num_threads()} threads)"

    def __call__(self, pixels: np.ndarray) -> int:
        from scipy import ndimage
        from skimage import measure, morphology

        if self.pixel_size_nm != self.frame_pixel_size_nm:
            pixels = resample(pixels.astype(np.float32), self.frame_pixel_size_nm / self.pixel_size_nm)
        image = ndimage.median_filter(pixels, 3).astype(np.float32)
        image /= image.max()  # the seed's features see this image
        # the network sees what it was trained on (the seed's models: the same divide by the maximum);
        # a z-score model given max-scaled frames finds no particles, and the naive run would skip its loops
        net_input = image if self.normalisation == "max" else normalise(image, self.normalisation)
        prob = np.zeros_like(image)
        with self.torch.no_grad():
            for r in range(0, image.shape[0], 512):
                for c in range(0, image.shape[1], 512):
                    # the seed's frames were multiples of 512; others need their edge tiles padded
                    tile, (h, w) = pad_to_multiple(net_input[r : r + 512, c : c + 512], self.divisor)
                    out = self.net(self.torch.from_numpy(np.ascontiguousarray(tile))[None, None])
                    prob[r : r + h, c : c + w] = out[0, 1, :h, :w].numpy()
        mask = morphology.closing(morphology.opening(prob > self.threshold, morphology.disk(self.open_px)),
                                  morphology.disk(self.close_px))
        # a flat crop gives the seed's features 0/0 (NaN, which the forest takes): not worth a warning each
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._particles(measure.label(mask), image)

    def _particles(self, labels: np.ndarray, image: np.ndarray) -> int:
        """The seed's per-particle loop: FFT radial profile, five features, one forest call each."""
        from skimage import measure

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


def time_naive(naive: NaivePipeline, frame: Frame, repeats: int) -> dict[str, Any]:
    """Median and p99 of ``naive`` on ``frame`` after one untimed warm-up: ``repeats`` runs; half as
    many when the warm-up took over 1 s; none more when it took over 10 s (a 4096² frame at the
    camera's sampling takes ~a minute on two cores), the warm-up then being the one run (torch's
    first-call cost is well under 1 % of it)."""
    side = round(frame.pixels.shape[0] * frame.pixel_size_nm / naive.pixel_size_nm)
    start = time.perf_counter()
    particles = naive(frame.pixels)
    first = time.perf_counter() - start
    if first > 10.0:
        return {"pixel_size_nm": naive.pixel_size_nm, "side_px": side, "particles": particles, "runs": 1,
                **summary([first])}
    runs = []
    for _ in range(max(1, repeats // 2) if first > 1.0 else repeats):
        start = time.perf_counter()
        naive(frame.pixels)
        runs.append(time.perf_counter() - start)
    return {"pixel_size_nm": naive.pixel_size_nm, "side_px": side, "particles": particles, "runs": len(runs),
            **summary(runs)}


def timed_analyses(analyser: Analyser, frame: Frame, repeats: int, batch: Batch) -> list[tuple[float, Analysis]]:
    """``repeats`` timed analyses of ``frame`` on the batch path, after two untimed warm-ups (session
    allocation for this shape; OpenVINO compiles a static model for a shape that comes again);
    empty when the analyser refuses the frame."""

    def timed(f: Frame) -> tuple[float, Analysis]:
        start = time.perf_counter()
        analysis = analyser.analyse(f)
        return time.perf_counter() - start, analysis

    if not list(batch.analyse([frame], analyser.analyse)):  # the warm-ups; a refused frame fails once
        return []
    analyser.analyse(frame)
    return [result for _, result in batch.analyse(itertools.repeat(frame, repeats), timed)]


def measure_size(analyser: Analyser, frame: Frame, repeats: int, batch: Batch, *, gpu: bool) -> dict[str, Any] | None:
    """One backend on one frame size: stages and end to end (single frames), then the pipelined runs."""
    runs = timed_analyses(analyser, frame, repeats, batch)
    if not runs:
        return None
    stage_runs: dict[str, list[float]] = {}
    for _, analysis in runs:
        for stage, seconds in analysis.timings_s.items():
            stage_runs.setdefault(stage, []).append(seconds)
    end_to_end = summary([seconds for seconds, _ in runs])
    entry: dict[str, Any] = {
        "dtype": str(frame.pixels.dtype), "particles": len(runs[-1][1].regions), "runs": len(runs), **end_to_end,
        "frames_per_s": 1.0 / end_to_end["median_s"],
        "stages": {stage: summary(seconds) for stage, seconds in stage_runs.items()},
    }
    saturated, paced = run_pipelined(analyser, frame, frames=pipelined_frames(repeats, end_to_end["median_s"]),
                                     warm_batches=gpu,
                                     goal_fps=GOALS["gpu_4096_frames_per_s"]["at_least"] if gpu else None)
    entry["pipelined"], entry["paced"] = saturated, paced
    return entry


def _field(entry: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def judge_goals(backends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each goal of `GOALS` checked against every measured entry it applies to.

    >>> judge_goals({"onnxruntime": {"kind": "onnxruntime", "sizes": {"1024": {"median_s": 0.05}}}})["results"]
    [{'goal': 'cpu_1024_median_s', 'backend': 'onnxruntime', 'size': 1024, 'value': 0.05, 'at_most': 0.06, 'met': True}]
    """
    results = []
    for name, goal in GOALS.items():
        for backend, measured in backends.items():
            if "sizes" not in measured or ("gpu" if measured["kind"] in ACCELERATORS else "cpu") != goal["on"]:
                continue
            for side, entry in measured["sizes"].items():
                value = _field(entry, goal["field"])
                if value is None or (goal["sizes"] is not None and int(side) not in goal["sizes"]):
                    continue
                limit = {k: goal[k] for k in ("at_most", "at_least") if k in goal}
                met = value <= goal["at_most"] if "at_most" in goal else value >= goal["at_least"]
                results.append({"goal": name, "backend": backend, "size": int(side), "value": value, **limit,
                                "met": bool(met)})
    return {"definitions": GOALS, "results": results, "all_met": all(r["met"] for r in results) if results else None}


def _open(profile: str, kind: str, threads: int | None) -> tuple[Analyser | None, str | None]:
    """The analyser on backend ``kind``, or why it cannot run here."""
    reason = unavailable(kind)
    if reason is None:
        try:
            return Analyser(profile, backend=kind, threads=threads), None
        except ModelError as err:  # present but cannot load this profile's network: the others still run
            reason = str(err)
    log.info("bench: backend %s skipped: %s", kind, reason)
    return None, reason


def run_pipeline_bench(
    profile: str = "nanoparticles",
    *,
    backends: Sequence[str] = ("auto",),
    sizes: Sequence[int] = (1024, 4096),
    repeats: int = 7,
    naive: bool = True,
    threads: int | None = None,
    on_failure: Callable[[Failure], None] | None = None,
) -> dict[str, Any]:
    """Per backend and frame side: median and p99 per stage and end to end, frames/s through the pipelined
    runner, and the speed-up over the naive pipeline at the camera's and at the model's sampling.

    A backend that cannot run here is reported as ``{"skipped": reason}``; `ModelError` when none can.
    A size the analyser refuses is left out and listed in ``failures`` (and passed to ``on_failure``).

    Examples
    --------
    >>> results = run_pipeline_bench(backends=["onnxruntime", "cuda"], sizes=(1024,), repeats=3)  # doctest: +SKIP
    >>> results["backends"]["cuda"]  # doctest: +SKIP
    {'skipped': 'torch has no CUDA device here'}
    >>> round(results["backends"]["onnxruntime"]["sizes"]["1024"]["speedup_vs_naive_model"], 1)  # doctest: +SKIP
    3.4
    """
    host = machine(threads)  # the load average before the bench adds its own
    analysers = {kind: _open(profile, kind, threads) for kind in dict.fromkeys(backends)}
    opened = [a for a, _ in analysers.values() if a is not None]
    if not opened:
        raise ModelError("bench: no backend can run here: "
                         + "; ".join(f"{kind}: {reason}" for kind, (_, reason) in analysers.items()))
    first = opened[0]
    frames = {side: synthetic_frame(side) for side in sizes}
    results: dict[str, Any] = {
        "profile": {k: v for k, v in first.model_ids.items() if k != "backend"}, "machine": host,
        "frame_pixel_size_nm": BENCH_PIXEL_SIZE_NM, "model_pixel_size_nm": first.manifest.segmentation.pixel_size_nm,
        "repeats": repeats, "p99": P99_NOTE,
        "naive": _naive(first, frames, repeats) if naive else {"skipped": "--no-naive"},
    }
    batch = Batch(on_failure=on_failure)
    results["backends"] = {}
    for kind, (analyser, reason) in analysers.items():
        if analyser is None:
            results["backends"][kind] = {"skipped": reason}
            continue
        resolved = resolve(kind)
        measured: dict[str, Any] = {"kind": resolved, "backend": analyser.backend.name,
                                    "device": getattr(analyser.backend, "device", None) or host["cpu"], "sizes": {}}
        for side, frame in frames.items():
            entry = measure_size(analyser, frame, repeats, batch, gpu=resolved in ACCELERATORS)
            if entry is None:
                continue
            for sampling in ("camera", "model"):
                if "sizes" in results["naive"] and str(side) in results["naive"]["sizes"]:
                    naive_s = results["naive"]["sizes"][str(side)][sampling]["median_s"]
                    entry[f"speedup_vs_naive_{sampling}"] = naive_s / entry["median_s"]
            measured["sizes"][str(side)] = entry
        results["backends"][kind] = measured
    results["goals"] = judge_goals(results["backends"])
    results["failures"] = [f.as_dict() for f in batch.failures]
    return results


def _naive(analyser: Analyser, frames: dict[int, Frame], repeats: int) -> dict[str, Any]:
    """The naive pipeline at the camera's and at the model's sampling for every size, or why it was skipped."""
    try:
        camera = NaivePipeline(analyser.directory, analyser.manifest)
    except ImportError as err:
        return {"skipped": f"{err} (install the [train] extra for torch)"}
    model = camera.at_sampling(analyser.manifest.segmentation.pixel_size_nm)
    return {"device": camera.device,
            "sizes": {str(side): {sampling: time_naive(pipeline, frame, repeats)
                                  for sampling, pipeline in (("camera", camera), ("model", model))}
                      for side, frame in frames.items()}}


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def format_results(results: dict[str, Any]) -> str:
    """A short table per backend, the naive times, and the goals not met."""
    host = results["machine"]
    lines = [f"machine: {host['cpu']}, {host['usable_cores']} usable cores, load {host['load_average_at_start'][0]} "
             f"at start; times in ms, {results['p99']}"]
    naive = results["naive"]
    for kind, measured in results["backends"].items():
        if "skipped" in measured:
            lines.append(f"\n{kind}: skipped ({measured['skipped']})")
            continue
        lines.append(f"\n{kind} → {measured['backend']} on {measured['device']}")
        lines.append(f"{'size':>6} {'median':>8} {'p99':>8} {'frames/s':>8} {'piped f/s':>9} {'paced p99':>9}"
                     f" {'× naive cam':>11} {'× naive model':>13}")
        for side, e in measured["sizes"].items():
            cam, mod = (f"{e[f'speedup_vs_naive_{s}']:.1f}" if f"speedup_vs_naive_{s}" in e else "-"
                        for s in ("camera", "model"))
            piped, paced = e["pipelined"]["frames_per_s"] or 0.0, e["paced"]["latency_p99_s"] or 0.0
            lines.append(f"{side + '²':>6} {_ms(e['median_s']):>8} {_ms(e['p99_s']):>8} {e['frames_per_s']:>8.1f} "
                         f"{piped:>9.1f} {_ms(paced):>9} {cam:>11} {mod:>13}")
            lines.append("       stages (median/p99): " + ", ".join(
                f"{k} {_ms(v['median_s'])}/{_ms(v['p99_s'])}" for k, v in e["stages"].items()))
    if "sizes" in naive:
        lines.append(f"\nnaive ({naive['device']}): " + "; ".join(
            f"{side}²: camera {_ms(n['camera']['median_s'])}, model sampling {_ms(n['model']['median_s'])}"
            for side, n in naive["sizes"].items()))
    else:
        lines.append(f"\nnaive pipeline skipped: {naive['skipped']}")
    goals = results["goals"]["results"]
    missed = [g for g in goals if not g["met"]]
    lines.append(f"goals: {len(goals) - len(missed)} of {len(goals)} met" if goals
                 else "goals: none applies to these backends and sizes")
    lines += [f"  not met: {g['goal']} {g['backend']} {g['size']}²: {g['value']:.4g} "
              + (f"> {g['at_most']:g}" if "at_most" in g else f"< {g['at_least']:g}") for g in missed]
    return "\n".join(lines)
