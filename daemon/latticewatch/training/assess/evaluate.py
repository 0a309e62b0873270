"""Score a profile's segmentation against hand or simulated labels, next to the classical baselines.

The network runs exactly as in ``latticewatch process`` (:class:`~latticewatch.runtime.analyser.Analyser`:
resampling to the model's pixel size, median, normalisation, tiling). Two of its masks are scored:

``model``
    the particle probability map, brought back to the frame's size as ``process
    --save-probabilities`` writes it, thresholded at ``segmentation.threshold`` (or
    ``--threshold``). This is the pixel classification the papers report (Groschner et al. 2021:
    Dice 0.80; Sadre et al. 2021: Jaccard 0.812) and what ``calibrate threshold`` tunes.
``model_isolated``
    the class mask after isolation (threshold, opening, closing, hole filling, small regions
    dropped) — what regions are measured and classified on. It is reported as well because
    morphology can move Dice either way.

The baselines (:mod:`latticewatch.training.assess.baselines`) see the same preprocessed,
model-resolution image as the network; their masks are brought back to frame size like the
network's. Metrics are pooled over every pixel of the set (:mod:`latticewatch.training.assess.metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.errors import FrameError
from latticewatch.frame import Analysis, Frame
from latticewatch.runtime.analyser import Analyser, Prepared, nearest_index
from latticewatch.runtime.batch import Batch, Failure
from latticewatch.training.assess.baselines import BASELINES, Baseline, BaselineError, baseline_from_dict, make_baseline
from latticewatch.training.assess.metrics import METRIC_KEYS, PixelCounts, segmentation_metrics
from latticewatch.training.data.labelled import (
    LabelledDataError,
    LabelledImage,
    group_folds,
    labelled_files,
    load_labelled,
    read_mask,
)

log = logging.getLogger(__name__)

#: Seed of the deterministic split used when baselines are cross-fitted on the evaluation set.
CROSS_FIT_SEED = 0


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``mask`` on a grid of ``shape`` by nearest pixel centre (the analyser's mapping).

    >>> resize_nearest(np.eye(2, dtype=bool), (4, 4)).astype(int)[0]
    array([1, 1, 0, 0])
    """
    if mask.shape == tuple(shape):
        return mask
    rows, cols = nearest_index(shape[0], mask.shape[0]), nearest_index(shape[1], mask.shape[1])
    return mask[rows[:, None], cols[None, :]]


@dataclass
class ScoredImage:
    """One labelled frame after the network: what the baselines and metrics need."""

    name: str  # the image's stem; ``<stem>#<section>`` for a section of a stack
    frame_id: str
    truth: np.ndarray  # bool, frame size
    model_image: np.ndarray  # the preprocessed image the network saw (model resolution)
    model_truth: np.ndarray  # label on the model-resolution grid
    probability: np.ndarray  # float32, frame size
    isolated: np.ndarray  # bool, frame size
    pixel_size_nm: float | None


def frame_of(item: LabelledImage) -> Frame:
    return Frame(frame_id=item.name, pixels=item.pixels, pixel_size_nm=item.pixel_size_nm, origin=item.name)


def score_frame(analyser: Analyser, frame: Frame, truth: np.ndarray, name: str) -> ScoredImage:
    """The analyser's prepare → segment → finish on one labelled frame, as ``process`` runs it.

    Raises `FrameError` when the frame cannot be analysed (too small, NaN pixels, …).
    """
    prepared: Prepared = analyser.prepare(frame)
    probability = analyser.segment_batch([prepared])[0]
    analysis: Analysis = analyser.finish(prepared, probability, keep_probability=True)
    image = prepared.pre.image
    return ScoredImage(
        name=name,
        frame_id=frame.frame_id,
        truth=truth,
        model_image=image,
        model_truth=resize_nearest(truth, image.shape),
        probability=analysis.probability,
        isolated=analysis.mask > 0,
        pixel_size_nm=frame.pixel_size_nm,
    )


def run_model(analyser: Analyser, data: Sequence[LabelledImage], *, progress: bool = False) -> Iterator[ScoredImage]:
    """`score_frame` on labelled images already in memory (``calibrate threshold``).

    Raises
    ------
    LabelledDataError
        When an image cannot be analysed (too small, NaN pixels, …), naming it.
    """
    from tqdm import tqdm

    for item in tqdm(data, desc="evaluate", unit="image", disable=not progress):
        try:
            yield score_frame(analyser, frame_of(item), item.mask, item.name)
        except FrameError as err:
            raise LabelledDataError(f"{item.name}: cannot be analysed: {err}") from err


def score_files(analyser: Analyser, images_dir: Path, labels_dir: Path, batch: Batch) -> list[ScoredImage]:
    """Every frame of every labelled image file, on the batch path, scored against its file's label.

    Images and labels pair by file stem (:func:`~latticewatch.training.data.labelled.labelled_files`).
    The sections of a stack share its label and are named ``<stem>#<section>``. A file or section
    that cannot be read, or a frame that cannot be analysed, is a failure in ``batch``; a label that
    is missing, unreadable or of another shape than its image raises `LabelledDataError`, and so
    does a set in which no frame could be scored.
    """
    pairs = labelled_files(images_dir, labels_dir)
    by_image = {str(image): (stem, label) for stem, image, label in pairs}
    masks: dict[Path, np.ndarray] = {}

    def score(frame: Frame) -> ScoredImage:
        stem, label = by_image[frame.origin]
        if label not in masks:
            masks.clear()  # a stack's sections come one after another: keep only the current file's mask
            masks[label] = read_mask(label)
        truth = masks[label]
        if truth.shape != frame.pixels.shape:
            raise LabelledDataError(f"{label}: mask shape {truth.shape} differs from image shape {frame.pixels.shape}")
        section = frame.frame_id.removeprefix(frame.origin)  # "#<section>" for a stack, else ""
        return score_frame(analyser, frame, truth, stem + section)

    scored = [result for _, result in batch.run([image for _, image, _ in pairs], score)]
    if not scored:
        raise LabelledDataError(f"{images_dir}: no image could be analysed ({len(batch.failures)} failed)")
    unsized = [s.name for s in scored if s.pixel_size_nm is None]
    model_px = analyser.manifest.segmentation.pixel_size_nm
    if unsized and model_px:
        log.warning("%d of %d images carry no pixel size (e.g. %s): they are not resampled to the model's %.4g nm/px",
                    len(unsized), len(scored), unsized[0], model_px)
    return scored


def prepared_images(analyser: Analyser, data: Sequence[LabelledImage]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Model-resolution images and labels of a fitting set (no network needed)."""
    images, masks = [], []
    for item in data:
        try:
            image = analyser.prepare(frame_of(item)).pre.image
        except FrameError as err:
            raise LabelledDataError(f"{item.name}: cannot be analysed: {err}") from err
        images.append(image)
        masks.append(resize_nearest(item.mask, image.shape))
    return images, masks


@dataclass
class Method:
    """Pooled and per-image counts of one segmentation method."""

    counts: PixelCounts = field(default_factory=PixelCounts)
    per_image: list[tuple[str, PixelCounts]] = field(default_factory=list)

    def add(self, name: str, predicted: np.ndarray, truth: np.ndarray) -> None:
        c = PixelCounts.of(predicted, truth)
        self.counts = self.counts + c
        self.per_image.append((name, c))

    def report(self, per_image: bool) -> dict[str, Any]:
        out = segmentation_metrics(self.counts)
        if per_image:
            out["per_image"] = [{"name": n, **segmentation_metrics(c)} for n, c in self.per_image]
        return out


@dataclass
class BaselinePlan:
    """Which fitted parameters score which images, and where they came from."""

    source: str  # "manifest", "fit_set", "cross_fit" or "in_sample"
    note: str
    # per group: (names scored with these parameters, {baseline: fitted instance})
    groups: list[tuple[list[str], dict[str, Baseline]]]

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "note": self.note,
            "groups": [{"images": names, "params": {k: b.to_dict() for k, b in fitted.items()}}
                       for names, fitted in self.groups],
        }


def parse_baselines(text: str | None) -> list[str]:
    """``"otsu,fourier,bragg"`` → names; ``"none"`` or ``""`` → no baselines.

    >>> parse_baselines("bragg, otsu"), parse_baselines("none")
    (['bragg', 'otsu'], [])
    """
    if text is None:
        return list(BASELINES)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise BaselineError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)} or 'none'")
    return names


def fit_baselines(names: Sequence[str], images: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, Baseline]:
    """Fresh baselines of the given names, each fitted on the (model-resolution) images and masks."""
    out = {}
    for name in names:
        log.info("fitting baseline %s on %d images", name, len(images))
        out[name] = make_baseline(name).fit(images, masks)
    return out


def plan_baselines(
    names: Sequence[str],
    analyser: Analyser,
    scored: Sequence[ScoredImage],
    *,
    fit_data: Sequence[LabelledImage] | None = None,
) -> BaselinePlan | None:
    """Baseline parameters in order of preference: the profile's manifest, a separate fitting
    set, else the evaluation set itself by 2-fold cross-fitting.

    Cross-fitting splits the evaluation set into two halves that keep acquisition series
    together (:func:`~latticewatch.training.data.labelled.group_folds`, seed 0), fits on each half
    and scores the other, so no image is scored with parameters fitted on it.
    """
    if not names:
        return None
    all_names = [s.name for s in scored]
    stored = analyser.manifest.baselines
    if all(n in stored for n in names):
        fitted = {n: baseline_from_dict(stored[n], n) for n in names}
        return BaselinePlan("manifest", "parameters stored in the profile manifest", [(all_names, fitted)])
    if fit_data is not None:
        images, masks = prepared_images(analyser, fit_data)
        return BaselinePlan("fit_set", f"fitted on {len(fit_data)} images of the fitting set",
                            [(all_names, fit_baselines(names, images, masks))])
    by_name = {s.name: s for s in scored}
    try:
        halves = group_folds(all_names, 2, seed=CROSS_FIT_SEED)
    except LabelledDataError:
        # a single series cannot be split: fitting and scoring overlap, and the note says so
        fitted = fit_baselines(names, [s.model_image for s in scored], [s.model_truth for s in scored])
        return BaselinePlan("in_sample", "fitted on the evaluation set itself (one series, cannot split): optimistic",
                            [(all_names, fitted)])
    groups = []
    for scored_half, fit_half in ((halves[1], halves[0]), (halves[0], halves[1])):
        fit_scored = [by_name[n] for n in fit_half]
        fitted = fit_baselines(names, [s.model_image for s in fit_scored], [s.model_truth for s in fit_scored])
        groups.append((scored_half, fitted))
    return BaselinePlan(
        "cross_fit",
        "no fitted parameters in the manifest and no --fit-images: fitted on one half of the evaluation set, "
        "scored on the other, and vice versa",
        groups,
    )


def score_baselines(names: Sequence[str], plan: BaselinePlan | None,
                    scored: Sequence[ScoredImage]) -> dict[str, Method]:
    """Each baseline's predictions on the images it was not fitted on, as the plan's groups say.

    Examples
    --------
    >>> methods = score_baselines(["bragg"], plan_baselines(["bragg"], analyser, scored), scored)  # doctest: +SKIP
    >>> methods["bragg"].report(False)["dice"]  # doctest: +SKIP
    0.71
    """
    methods = {n: Method() for n in names}
    by_name = {s.name: s for s in scored}
    for group_names, fitted in plan.groups if plan else []:
        for image_name in group_names:
            s = by_name[image_name]
            for n in names:
                predicted = resize_nearest(fitted[n].predict(s.model_image), s.truth.shape)
                methods[n].add(image_name, predicted, s.truth)
    # per-image lists in the order of the evaluation set, whatever order the groups scored them
    order = {s.name: i for i, s in enumerate(scored)}
    for m in methods.values():
        m.per_image.sort(key=lambda item: order[item[0]])
    return methods


def evaluate(
    profile: str | Path,
    images_dir: Path,
    labels_dir: Path,
    *,
    threshold: float | None = None,
    baselines: Sequence[str] = tuple(BASELINES),
    fit_images: Path | None = None,
    fit_labels: Path | None = None,
    per_image: bool = False,
    threads: int | None = None,
    backend: str = "auto",
    progress: bool = False,
    on_failure: Callable[[Failure], None] | None = None,
) -> dict[str, Any]:
    """Score a profile (and the baselines) on a labelled set; returns the JSON-ready report.

    Every frame of every image file is read and analysed on the batch path, as ``process`` does
    (:func:`score_files`): a file, section or frame that fails is reported in ``failures``.

    Parameters
    ----------
    profile
        Installed profile name or profile directory.
    images_dir, labels_dir
        Images and their masks, paired by file stem (:func:`~latticewatch.training.data.labelled.labelled_files`).
    threshold
        Decision threshold on the particle probability; default the manifest's ``segmentation.threshold``.
        It also replaces ``isolation.threshold`` for ``model_isolated``, as if the manifest said so.
    baselines
        Names of the baselines to run alongside (empty: none).
    fit_images, fit_labels
        A separate labelled set to fit the baselines on when the manifest has no fitted ones.
    backend
        Inference backend (`latticewatch.models.backends.BACKEND_CHOICES`).
    on_failure
        Called with each failed file or frame as it happens.

    Returns
    -------
    dict
        ``profile``, ``threshold``, ``n_images``, ``frame_ids`` (the frames scored), ``model``,
        ``model_isolated``, ``baselines`` (name → metrics), ``baseline_fit`` (where the parameters
        came from), ``failures`` (``{"file", "frame_id", "error"}`` each); each metrics block has
        :data:`~latticewatch.training.assess.metrics.METRIC_KEYS` and ``confusion_matrix``, plus
        ``per_image`` when asked.

    Raises
    ------
    LabelledDataError
        When a folder, an image's label or every frame is unusable.

    Examples
    --------
    >>> report = evaluate("nanoparticles", Path("sim/images"), Path("sim/labels"))  # doctest: +SKIP
    >>> report["model"]["dice"], report["baselines"]["bragg"]["dice"]  # doctest: +SKIP
    (0.86, 0.71)
    """
    analyser = Analyser(profile, backend=backend, threads=threads)
    manifest = analyser.manifest
    t = manifest.segmentation.threshold if threshold is None else float(threshold)
    if threshold is not None:
        # the isolated mask must be what `process` would give with this threshold in the manifest
        isolation = manifest.isolation.model_copy(update={"threshold": t})
        analyser.manifest = manifest.model_copy(update={"isolation": isolation})
    names = list(baselines)
    fit_data = None
    if fit_images is not None or fit_labels is not None:
        if fit_images is None or fit_labels is None:
            raise LabelledDataError("--fit-images and --fit-labels go together")
        if names and not all(n in manifest.baselines for n in names):
            fit_data = load_labelled(Path(fit_images), Path(fit_labels))
    batch = Batch(on_failure=on_failure, progress=progress, desc="evaluate")
    scored = score_files(analyser, Path(images_dir), Path(labels_dir), batch)
    model, isolated = Method(), Method()
    for s in scored:
        model.add(s.name, s.probability >= t, s.truth)
        isolated.add(s.name, s.isolated, s.truth)

    plan = plan_baselines(names, analyser, scored, fit_data=fit_data)
    if plan is not None and plan.source in ("cross_fit", "in_sample"):
        log.info("baselines: %s", plan.note)  # the command line prints it as a warning
    methods = score_baselines(names, plan, scored)

    return {
        "profile": f"{manifest.name}@{manifest.version}",
        "profile_dir": str(analyser.directory),
        "images": str(images_dir),
        "labels": str(labels_dir),
        "n_images": len(scored),
        "frame_ids": [s.frame_id for s in scored],
        "threshold": t,
        "model_pixel_size_nm": manifest.segmentation.pixel_size_nm,
        "model": model.report(per_image),
        "model_isolated": isolated.report(per_image),
        "baselines": {n: methods[n].report(per_image) for n in names},
        "baseline_fit": plan.describe() if plan else None,
        "failures": [f.as_dict() for f in batch.failures],
    }


_COLUMNS = (("dice", "Dice"), ("jaccard", "Jaccard"), ("precision", "precision"), ("recall", "recall"),
            ("accuracy", "accuracy"), ("balanced_accuracy", "bal. acc."))


def format_report(report: dict[str, Any]) -> str:
    """The human table of :func:`evaluate`'s report (one row per method, pooled metrics)."""
    t = report["threshold"]
    rows = [("model", f"model (p >= {t:.2f})", report["model"]),
            ("isolated", "model, isolated", report["model_isolated"])]
    rows += [(name, f"{name} baseline", m) for name, m in report["baselines"].items()]
    width = max(len(r[1]) for r in rows)
    lines = [f"profile {report['profile']} on {report['n_images']} labelled image(s) from {report['images']}",
             "metrics pooled over all pixels of the set (foreground = label > 0)", ""]
    lines.append(f"{'method':<{width}}  " + "  ".join(f"{h:>9}" for _, h in _COLUMNS))
    for _, label, m in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{m[k]:>9.3f}" for k, _ in _COLUMNS))
    fit = report.get("baseline_fit")
    if fit:
        lines += ["", f"baseline parameters: {fit['note']}"]
    if "per_image" in report["model"]:
        pad = max(5, *(len(p["name"]) for p in report["model"]["per_image"]))
        lines += ["", "Dice per image:", "image".ljust(pad) + "  " + "  ".join(f"{short:>9}" for short, _, _ in rows)]
        for i, entry in enumerate(report["model"]["per_image"]):
            dice = (f"{m['per_image'][i]['dice']:>9.3f}" for _, _, m in rows)
            lines.append(entry["name"].ljust(pad) + "  " + "  ".join(dice))
    return "\n".join(lines)


__all__ = ["METRIC_KEYS", "evaluate", "format_report", "parse_baselines", "plan_baselines", "resize_nearest",
           "run_model", "score_baselines", "score_files", "score_frame"]
