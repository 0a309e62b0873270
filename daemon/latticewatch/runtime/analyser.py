"""The analyser: one profile's stages wired together, with per-stage timing around each call.

Stages stay pure functions; only this module knows the order, converts between the model's
sampling and the frame's, and measures how long each stage took.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from latticewatch.errors import FrameError, ModelError
from latticewatch.frame import MIN_SIDE_PX, Analysis, Frame, Region
from latticewatch.io.pixel_size import check_pixel_size, check_resampling
from latticewatch.models.architectures import receptive_field
from latticewatch.models.backends import (
    ACCELERATORS,
    DeviceMemoryError,
    SegmentationBackend,
    cpu_default,
    cpu_threads,
    model_files,
    open_backend,
    resolve,
)
from latticewatch.models.backends.fallback import FallbackBackend, open_guarded
from latticewatch.models.manifest import Manifest
from latticewatch.runtime.plugins import resolve_profile
from latticewatch.stages.classify import CnnRegionClassifier, FlatForest, ForestRegionClassifier, Verdict, load_forest
from latticewatch.stages.domain import out_of_domain
from latticewatch.stages.features import region_features
from latticewatch.stages.isolate import IsolatedRegion, clean_labels, measure
from latticewatch.stages.preprocess import Preprocessed, pad_to_multiple, preprocess
from latticewatch.stages.segment import segment

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Index into an axis of length ``n_in`` for each of ``n_out`` pixels (pixel-centre aligned).

    >>> nearest_index(4, 2).tolist()
    [0, 0, 1, 1]
    """
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def validate_pixels(frame: Frame, model_pixel_size_nm: float | None = None) -> None:
    """Refuse frames the stages would turn into nonsense, naming the frame and the problem.

    The pixel size must pass `check_pixel_size`, and resampling the frame to ``model_pixel_size_nm``
    must pass `check_resampling` (bounded enlargement and size), so no frame can take minutes or
    gigabytes because of a wrong calibration. The message says where the size came from.

    >>> validate_pixels(Frame("cam:a", np.zeros((64, 64), np.uint16), float("nan"), meta={"pixel_size_source": "mdoc"}))
    Traceback (most recent call last):
    ...
    latticewatch.io.pixel_size.PixelSizeError: cam:a: pixel size (mdoc): nan nm per pixel is not a finite number
    """
    px = frame.pixels
    if px.ndim != 2:
        raise FrameError(f"{frame.frame_id}: expected a 2-D image, got shape {px.shape}")
    if min(px.shape) < MIN_SIDE_PX:
        raise FrameError(f"{frame.frame_id}: image is {px.shape[0]}×{px.shape[1]} px; "
                         f"at least {MIN_SIDE_PX} px per side needed")
    if not (np.issubdtype(px.dtype, np.integer) or np.issubdtype(px.dtype, np.floating)):
        raise FrameError(f"{frame.frame_id}: unsupported pixel type {px.dtype}")
    if np.issubdtype(px.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(px)))
        if bad:
            raise FrameError(f"{frame.frame_id}: {bad} NaN/Inf pixels")
    if frame.pixel_size_nm is not None:
        origin = frame.meta.get("pixel_size_source")
        nm = check_pixel_size(frame.pixel_size_nm,
                              where=f"{frame.frame_id}: pixel size" + (f" ({origin})" if origin else ""))
        check_resampling(px.shape, nm, model_pixel_size_nm, where=frame.frame_id)


def load_classifier(directory: Path, manifest: Manifest, *, threads: int | None = None, backend: str = "onnxruntime"
                    ) -> tuple[ForestRegionClassifier | CnnRegionClassifier | None, str | None]:
    """The profile's region classifier and the file it was loaded from (both ``None`` without one).

    A forest loads from its flattened arrays; a profile written before them has only the skops
    file, which needs scikit-learn and takes seconds to load, so that is said once. A CNN runs on
    ``backend`` (a kind of `latticewatch.models.backends`), or on the CPU when that kind cannot load it.

    >>> clf, name = load_classifier(directory, manifest)  # doctest: +SKIP
    >>> name  # doctest: +SKIP
    'forest.safetensors'
    """
    section = manifest.classifier
    if section is None:
        return None, None
    if section.kind == "cnn":
        model = model_files(directory, manifest, "classifier")
        try:
            net = open_guarded(backend, model, threads=threads)
        except ModelError as err:
            if resolve(backend) not in ACCELERATORS:
                raise
            log.warning("%s: backend %s cannot run the classifier (%s); it runs on %s", directory, backend, err,
                        cpu_default())
            net = open_backend(cpu_default(), model, threads=threads)
        return CnnRegionClassifier(net, section.classes, section.input,
                                   uncertain_below=section.uncertain_below), section.onnx
    if section.arrays:
        flat, name = FlatForest.load(directory / section.arrays), section.arrays
    else:
        log.warning("%s: the forest has no flattened arrays ('classifier.arrays'); loading %s needs scikit-learn "
                    "and is slow; write them with: latticewatch models flatten-forest %s",
                    directory, section.skops, directory)
        flat, name = FlatForest.from_sklearn(load_forest(directory / section.skops)), section.skops
    return ForestRegionClassifier(flat, section.classes, uncertain_below=section.uncertain_below), name


@dataclass
class Prepared:
    """A frame after `Analyser.prepare`: its model-ready image, timings and warnings so far."""

    frame: Frame
    pre: Preprocessed
    timings: dict[str, float]
    warnings: list[str]


class Analyser:
    """Loads a profile's models once and analyses frames with them.

    Parameters
    ----------
    profile
        Installed profile name (``nanoparticles``) or a profile directory.
    backend
        A kind of `latticewatch.models.backends` (``auto`` or ``None``: the fastest that runs here; one
        that cannot run here raises `ModelError` saying why), or an open segmentation backend. The CNN
        classifier runs on the same kind (on the CPU when that kind cannot load it; ONNX Runtime
        beside an open backend). An accelerator that runs out of memory falls back to smaller
        inputs, then the CPU, and says so in the frame's warnings (`FallbackBackend`).
    max_pixels
        Largest model-resolution image segmented in one run; larger ones are tiled.
    classifier
        ``"profile"``: the manifest's classifier; ``"baseline"``: its ``baseline_classifier`` (the
        paper's forest kept beside the CNN), everything else unchanged.

    Examples
    --------
    >>> analyser = Analyser("nanoparticles")  # doctest: +SKIP
    >>> analysis = analyser.analyse(frame)  # doctest: +SKIP
    >>> analysis.class_counts()  # doctest: +SKIP
    {'stacking_fault': 2, 'no_stacking_fault': 5, ...}
    """

    def __init__(
        self,
        profile: str | Path = "nanoparticles",
        *,
        backend: str | SegmentationBackend | None = "auto",
        threads: int | None = None,
        max_pixels: int = 2048 * 2048,
        classifier: Literal["profile", "baseline"] = "profile",
    ):
        self.directory, self.manifest = resolve_profile(str(profile))
        if classifier == "baseline":
            if self.manifest.baseline_classifier is None:
                raise ModelError(f"{self.directory}: the profile has no baseline_classifier")
            self.manifest = self.manifest.model_copy(update={"classifier": self.manifest.baseline_classifier})
        seg = self.manifest.segmentation
        backend = backend or "auto"
        kind = backend if isinstance(backend, str) else "onnxruntime"
        resolve(kind)  # an explicit kind that cannot run here fails before anything loads
        self.backend = backend if not isinstance(backend, str) else open_guarded(
            kind, model_files(self.directory, self.manifest), threads=threads, divisor=seg.divisor,
            receptive_field_px=receptive_field(seg.architecture, seg.widths))
        self.classifier, self._classifier_file = load_classifier(self.directory, self.manifest, threads=threads,
                                                                 backend=kind)
        self.max_pixels = max_pixels
        # a backend that preprocesses on its device does so (the torch backend: the raw frame goes up once)
        primary = self.backend.primary if isinstance(self.backend, FallbackBackend) else self.backend
        self._preprocess = getattr(primary, "prepare_on_device", preprocess)
        self._cnn_pool = ThreadPoolExecutor(cpu_threads(None), thread_name_prefix="latticewatch-cnn")

    @property
    def model_ids(self) -> dict[str, str]:
        """Identifiers of the exact model files in use (name@version + short sha256)."""
        m = self.manifest
        ids = {"profile": f"{m.name}@{m.version}",
               "segmentation": f"{m.segmentation.onnx}:{m.files[m.segmentation.onnx][:12]}"}
        if self._classifier_file:
            ids["classifier"] = f"{self._classifier_file}:{m.files[self._classifier_file][:12]}"
        ids["backend"] = self.backend.name
        return ids

    def analyse(self, frame: Frame, *, keep_probability: bool = False) -> Analysis:
        """Run every stage on one frame and return its analysis."""
        prepared = self.prepare(frame)
        return self.finish(prepared, self.segment_batch([prepared])[0], keep_probability=keep_probability)

    # The three phases below are `analyse` cut where a pipelined runner puts its queues:
    # CPU-bound preparation, the accelerator, CPU-bound post-processing.

    def prepare(self, frame: Frame) -> Prepared:
        """Validate and preprocess one frame (first phase of `analyse`); raises `FrameError`."""
        validate_pixels(frame, self.manifest.segmentation.pixel_size_nm)
        seg, clf = self.manifest.segmentation, self.manifest.classifier
        timings: dict[str, float] = {}
        warnings: list[str] = []
        if frame.pixel_size_nm is None:
            warnings.append("pixel size unknown: no resampling, sizes reported in pixels only")
        with _timed(timings, "preprocess"):
            # the forest's features are computed the way it was trained, whatever the network needs
            options = {"normalisation": seg.normalisation, "model_pixel_size_nm": seg.pixel_size_nm,
                       "feature_normalisation": clf.normalisation if clf and clf.kind == "forest" else None}
            try:
                pre = self._preprocess(frame.pixels, frame.pixel_size_nm, **options)
            except DeviceMemoryError as err:
                warnings.append(f"preprocessing on the CPU: {err}")
                pre = preprocess(frame.pixels, frame.pixel_size_nm, **options)
        return Prepared(frame, pre, timings, warnings)

    def segment_batch(self, prepared: Sequence[Prepared]) -> list[np.ndarray]:
        """Particle probabilities for several prepared frames (second phase of `analyse`).

        Frames whose padded model-resolution images have the same shape and fit in
        ``max_pixels`` together go through the backend as one batch; the others one by one
        (tiled when large). Each frame is charged its share of the batch's time.
        """
        seg = self.manifest.segmentation
        divisor, rf = seg.divisor, receptive_field(seg.architecture, seg.widths)
        out: list[np.ndarray | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prepared):
            padded_shape = tuple(-(-n // divisor) * divisor for n in p.pre.image.shape)
            key = padded_shape if math.prod(padded_shape) <= self.max_pixels else ("tiled", i)
            groups.setdefault(key, []).append(i)
        batches = []
        for key, members in groups.items():
            # a batch holds at most max_pixels: beyond that a CPU backend slows per frame (4 × 2048²: 3×)
            size = max(1, self.max_pixels // math.prod(key)) if key[0] != "tiled" else 1
            batches += [members[k:k + size] for k in range(0, len(members), size)]
        for members in batches:
            start = time.perf_counter()
            if len(members) > 1:
                padded = [pad_to_multiple(prepared[i].pre.image, divisor) for i in members]
                probs = self.backend.predict(np.stack([img for img, _ in padded])[:, None])
                for i, (_, (h, w)), prob in zip(members, padded, probs):
                    out[i] = prob[0, :h, :w]
            else:
                out[members[0]] = segment(prepared[members[0]].pre.image, self.backend, max_pixels=self.max_pixels,
                                          divisor=divisor, receptive_field_px=rf)
            share = (time.perf_counter() - start) / len(members)
            notes = self.backend.take_notes() if isinstance(self.backend, FallbackBackend) else []
            for i in members:
                prepared[i].timings["segment"] = prepared[i].timings.get("segment", 0.0) + share
                prepared[i].warnings.extend(notes)
        return out  # type: ignore[return-value]

    def finish(self, prepared: Prepared, probability: np.ndarray, *, keep_probability: bool = False) -> Analysis:
        """Isolate, measure and classify regions from the probability map (last phase of `analyse`)."""
        frame, pre, timings = prepared.frame, prepared.pre, prepared.timings
        with _timed(timings, "isolate"):
            labels = clean_labels(probability, self.manifest.isolation, pre.pixel_size_nm)  # labelled once
            clean, isolated = labels > 0, measure(labels)
        # the CNN needs no features: it runs beside the domain check and the features (its time overlaps theirs)
        beside = self._cnn_pool.submit(self._classify, prepared, labels, isolated, []) if (
            isinstance(self.classifier, CnnRegionClassifier) and isolated) else None
        with _timed(timings, "domain"):
            doubts = out_of_domain(probability, labels, self.manifest.domain, pre.image)
        with _timed(timings, "features"):
            features = [region_features(pre.feature_image[r.slice], labels[r.slice] == r.label, pre.pixel_size_nm)
                        for r in isolated]
        verdicts = beside.result() if beside is not None else self._classify(prepared, labels, isolated, features)
        with _timed(timings, "assemble"):
            regions = tuple(
                self._region(index, r, f, label, probs, pre.scale, pre.pixel_size_nm, frame)
                for index, (r, f, (label, probs)) in enumerate(zip(isolated, features, verdicts))
            )
            h, w = frame.pixels.shape
            rows, cols = nearest_index(h, clean.shape[0]), nearest_index(w, clean.shape[1])
            # one axis at a time on the bytes: a third of the time of a 2-D fancy index on a 4096² frame
            mask = np.take(np.take(clean.view(np.uint8), rows, axis=0), cols, axis=1)
            confidence = float(np.mean(np.maximum(probability, 1.0 - probability)))
            full_probability = None
            if keep_probability:
                full_probability = (
                    probability
                    if probability.shape == (h, w)
                    else ndimage.zoom(probability, (h / probability.shape[0], w / probability.shape[1]), order=1,
                                      grid_mode=True, mode="nearest")
                ).astype(np.float32)
        return Analysis(
            frame_id=frame.frame_id,
            mask=mask,
            regions=regions,
            timings_s=timings,
            model_ids=self.model_ids,
            profile=self.manifest.name,
            pixel_size_nm=frame.pixel_size_nm,
            mean_confidence=confidence,
            warnings=tuple(prepared.warnings),
            probability=full_probability,
            out_of_domain=doubts,
            defect_confusion=getattr(self.manifest.classifier, "defect_confusion", None),
        )

    def _classify(self, prepared: Prepared, labels: np.ndarray, isolated: list[IsolatedRegion],
                  features: list[dict[str, float]]) -> list[Verdict]:
        # the CNN sees each region's crop of the model input, the forest its five features
        with _timed(prepared.timings, "classify"):
            if isinstance(self.classifier, CnnRegionClassifier):
                verdicts = self.classifier(prepared.pre.image, labels, isolated)
                if isinstance(self.classifier.backend, FallbackBackend):  # notes of this thread's call
                    prepared.warnings.extend(self.classifier.backend.take_notes())
                return verdicts
            if self.classifier is not None:
                return self.classifier(features)
            return [("unclassified", {})] * len(isolated)

    def _region(self, index, r: IsolatedRegion, features, label, probs, scale, model_px_nm, frame: Frame) -> Region:
        h, w = frame.pixels.shape
        r0, c0, r1, c1 = r.bbox
        bbox = (int(r0 / scale), int(c0 / scale), min(h, math.ceil(r1 / scale)), min(w, math.ceil(c1 / scale)))
        cy, cx = ((r.centroid[0] + 0.5) / scale - 0.5, (r.centroid[1] + 0.5) / scale - 0.5)
        px = frame.pixel_size_nm
        area_nm2 = r.area_px * model_px_nm**2 if model_px_nm else None
        iso = self.manifest.isolation
        big = area_nm2 is not None and area_nm2 > iso.max_particle_area_nm2
        return Region(
            region_id=index,
            bbox=bbox,
            centroid_px=(round(cy, 2), round(cx, 2)),
            centroid_nm=(round(cy * px, 4), round(cx * px, 4)) if px else None,
            area_px=int(round(r.area_px / scale**2)),
            area_nm2=area_nm2,
            equivalent_diameter_nm=math.sqrt(4 * area_nm2 / math.pi) if area_nm2 is not None else None,
            eccentricity=r.eccentricity,
            solidity=r.solidity,
            touches_edge=r.touches_edge,
            agglomerate_suspect=big or r.solidity < iso.min_solidity,
            features=features,
            label=label,
            probabilities=probs,
        )
