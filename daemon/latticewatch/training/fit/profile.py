"""Build a complete profile directory (ONNX + safetensors [+ skops] + manifest), from synthetic
frames (`build_synthetic_profile`) or from labelled micrographs on disk (`build_labelled_profile`).

Both share `export_segmentation` (weights, ONNX, parity check against the float64 reference) and
write the manifest last, through `latticewatch.models.manifest.write_manifest`; every file is
written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file
from torch import nn

from latticewatch import __version__
from latticewatch.frame import CLASSES
from latticewatch.io.atomic import atomic_path
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.export import export_onnx, torch_probability
from latticewatch.models.manifest import Manifest, file_digests, relative_path, write_manifest
from latticewatch.stages.features import FEATURE_NAMES
from latticewatch.stages.preprocess import Normalisation
from latticewatch.training.assess.metrics import segmentation_metrics
from latticewatch.training.data.augment import synthetic_segmentation_set
from latticewatch.training.data.labelled import load_labelled, series_of
from latticewatch.training.data.supervised import (
    ExtraData,
    PreparedSet,
    prepare_extra,
    prepare_labelled,
    resolve_pixel_size,
    validation_split,
)
from latticewatch.training.fit.fold import content_ratio_spearman
from latticewatch.training.fit.forest import (
    FOREST_ARRAYS,
    FOREST_SKOPS,
    forest_files,
    forest_metrics,
    synthetic_region_features,
    train_forest,
)
from latticewatch.training.fit.unet import (
    TrainingResult,
    UNetTrainingConfig,
    dice_score,
    evaluate_net,
    predict_images,
    recorded_config,
    train_unet,
)

log = logging.getLogger(__name__)

#: Largest ONNX-vs-reference probability difference accepted when a trained model is exported.
#: Random-weight networks agree to < 1e-4 (tested); trained ones reach ~2e-4 at a few uncertain
#: pixels (p ≈ 0.4–0.5) because the max-normalised input is far from zero-mean and batch norm
#: cancels that offset, which amplifies float32 summation-order differences between ONNX Runtime's
#: and torch's convolutions (torch float32 itself sits 6e-5 from the float64 reference).
PARITY_TOLERANCE = 5e-4


def onnx_parity(net, onnx_path: Path, images: Sequence[np.ndarray], threshold: float = 0.5) -> dict[str, float]:
    """ONNX Runtime against the float64 torch reference on ``images`` (sides divisible by the
    net's divisor): worst and 99.99th-percentile absolute probability difference, and the
    fraction of pixels whose decision flips.

    >>> onnx_parity(net, Path("profile/unet.onnx"), [np.zeros((64, 64), np.float32)])  # doctest: +SKIP
    {'max_abs_diff': 3.1e-05, 'p99_99_abs_diff': 2.9e-05, 'decision_flip_fraction': 0.0}
    """
    backend = OnnxRuntimeBackend(onnx_path)
    diffs, flips = [], 0
    for image in images:
        ours = backend.predict(np.asarray(image, np.float32)[None, None])[0, 0]
        reference = torch_probability(net, image)
        diffs.append(np.abs(ours - reference).ravel())
        flips += int(np.count_nonzero((ours >= threshold) != (reference >= threshold)))
    diff = np.concatenate(diffs)
    return {"max_abs_diff": float(diff.max()), "p99_99_abs_diff": float(np.percentile(diff, 99.99)),
            "decision_flip_fraction": flips / diff.size}


def _divisible_crops(images: Sequence[np.ndarray], divisor: int, n: int = 4) -> list[np.ndarray]:
    """Up to ``n`` images cut down to multiples of ``divisor`` (the ONNX model's input rule)."""
    out = []
    for image in images[:n]:
        h, w = (s // divisor * divisor for s in image.shape)
        if h and w:
            out.append(np.ascontiguousarray(image[:h, :w]))
    return out


def export_segmentation(out_dir: Path, net: nn.Module, config: UNetTrainingConfig,
                        parity_images: Sequence[np.ndarray]) -> tuple[list[str], dict]:
    """Write ``<arch>.safetensors`` and ``<arch>.onnx`` (``unet.*`` for the U-Net) and check the
    ONNX model against the float64 torch reference on ``parity_images``.

    Returns the file names and the parity figures; raises ``RuntimeError`` beyond `PARITY_TOLERANCE`.

    >>> files, parity = export_segmentation(Path("profile"), result.net, config, val_images)  # doctest: +SKIP
    >>> files  # doctest: +SKIP
    ['unet.onnx', 'unet.safetensors']
    """
    stem = config.architecture
    weights, onnx = f"{stem}.safetensors", f"{stem}.onnx"
    with atomic_path(out_dir / weights) as tmp:
        save_file(net.state_dict(), str(tmp),
                  metadata={"architecture": config.architecture, "widths": json.dumps(list(config.widths))})
    with atomic_path(out_dir / onnx) as tmp:
        export_onnx(net, tmp)
    parity = onnx_parity(net, out_dir / onnx, _divisible_crops(parity_images, net.divisor))
    if parity["max_abs_diff"] > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch: {parity} (> {PARITY_TOLERANCE})")
    return [onnx, weights], parity


def segmentation_entry(config: UNetTrainingConfig, files: list[str], *, pixel_size_nm: float | None,
                       normalisation: Normalisation, foreground: str = "particle",
                       threshold: float = 0.5) -> dict[str, Any]:
    """The manifest's ``segmentation`` section for a net trained with ``config``.

    >>> segmentation_entry(UNetTrainingConfig(), ["unet.onnx", "unet.safetensors"], pixel_size_nm=0.05,
    ...                    normalisation="max")["onnx"]
    'unet.onnx'
    """
    return {"onnx": files[0], "weights": files[1], "architecture": config.architecture, "widths": config.widths,
            "pixel_size_nm": pixel_size_nm, "normalisation": normalisation, "threshold": threshold,
            "foreground": foreground}


def _write_profile(out_dir: Path, files: Sequence[str], **fields: Any) -> Manifest:
    """Validate and write the manifest of this latticewatch version, listing the sha256 of ``files``."""
    return write_manifest(out_dir, Manifest(version=__version__, files=file_digests(out_dir, files), **fields))


def _run_summary(result: TrainingResult) -> dict[str, Any]:
    return {"steps": result.steps, "best_step": result.best_step, "seconds": round(result.seconds, 1),
            "history": result.history}


def build_synthetic_profile(
    out_dir: Path,
    *,
    name: str,
    n_frames: int,
    n_regions_per_class: int,
    pixel_size_nm: float,
    config: UNetTrainingConfig,
    command: str,
    progress: bool = True,
) -> Manifest:
    """Train the segmentation net and the forest on fresh analytic frames and write a verified profile.

    >>> build_synthetic_profile(Path("profiles/np"), name="np", n_frames=300, n_regions_per_class=200,
    ...                         pixel_size_nm=0.05, config=UNetTrainingConfig(),
    ...                         command="latticewatch train --out profiles/np")  # doctest: +SKIP
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    n_val = max(4, n_frames // 10)
    train = synthetic_segmentation_set(n_frames, config.seed, pixel_size_nm=pixel_size_nm, progress=progress)
    val = synthetic_segmentation_set(n_val, config.seed + 1, pixel_size_nm=pixel_size_nm, progress=progress)
    checkpoint = out_dir / "checkpoint.safetensors"
    result = train_unet(train, val, config, progress=progress, checkpoint=checkpoint)

    val_prob = predict_images(result.net, val[0])
    seg_metrics = {"val_dice": round(dice_score(val_prob, val[1]), 4), "n_val_frames": n_val, **_run_summary(result)}
    files, seg_metrics["onnx_parity"] = export_segmentation(out_dir, result.net, config, val[0])
    checkpoint.unlink(missing_ok=True)

    X, y = synthetic_region_features(n_regions_per_class, config.seed + 2, pixel_size_nm=pixel_size_nm,
                                     progress=progress)
    X_test, y_test = synthetic_region_features(max(20, n_regions_per_class // 4), config.seed + 3,
                                               pixel_size_nm=pixel_size_nm, progress=progress)
    forest = train_forest(X, y, seed=config.seed)
    forest.n_jobs = 1  # inference runs single-threaded inside the pipeline
    with forest_files(out_dir, forest):
        pass  # both files are in place once the block ends

    return _write_profile(
        out_dir, [*files, FOREST_SKOPS, FOREST_ARRAYS],
        name=name,
        description="Nanoparticle particle/background U-Net (Groschner et al. 2021 architecture) and 5-class "
        "stacking-fault forest, trained on latticewatch's analytic HRTEM generator.",
        segmentation=segmentation_entry(config, files, pixel_size_nm=pixel_size_nm, normalisation="max"),
        classifier={"kind": "forest", "arrays": FOREST_ARRAYS, "skops": FOREST_SKOPS, "classes": CLASSES,
                    "features": FEATURE_NAMES},
        training={
            "segmentation": {"command": command,
                             "data": f"analytic generator, {n_frames} train + {n_val} validation 512² frames at "
                                     f"{pixel_size_nm} nm/px, seed {config.seed}",
                             "metrics": {**seg_metrics, "config": recorded_config(config)}},
            "classifier": {"command": command,
                           "data": f"analytic generator, {n_regions_per_class} regions per class "
                                   f"(+ {len(y_test)} held out)",
                           "metrics": forest_metrics(y_test, forest.predict(X_test))},
        },
    )


def _cv_for_manifest(cv: dict) -> dict:
    """A cross-validation result without its bulky per-image entries (the manifest stays readable)."""
    out = {k: v for k, v in cv.items() if k not in ("command", "data")}
    model = dict(out["model"])
    if "content_ratio_spearman" not in model:
        model["content_ratio_spearman"] = content_ratio_spearman(cv)
    model["per_fold"] = [{k: v for k, v in f.items() if k != "per_image"} for f in model["per_fold"]]
    out["model"] = model
    return out


def _cross_validation_entries(cross_validation: Sequence[dict], architecture: str) -> dict[str, dict]:
    """Manifest ``training`` entries of cross-validation results: the one of ``architecture`` as
    ``cross_validation``, the others (variants compared) as ``cross_validation_<arch>``."""
    entries: dict[str, dict] = {}
    for cv in cross_validation:
        key = "cross_validation" if cv.get("architecture") == architecture and "cross_validation" not in entries \
            else "cross_validation_" + str(cv.get("architecture", "other")).replace("-", "_")
        entries[key] = {"command": cv.get("command", ""), "data": cv.get("data", ""), "metrics": _cv_for_manifest(cv)}
    return entries


def _labelled_sets(images_dir: Path, labels_dir: Path, *, normalisation: Normalisation,
                   pixel_size_nm: float | str | None, val_fraction: float, val_dirs: tuple[Path, Path] | None,
                   seed: int) -> tuple[PreparedSet, PreparedSet, float | None, str]:
    """Training and validation sets, the model's pixel size and a description of the validation."""
    data = load_labelled(images_dir, labels_dir)
    model_px = resolve_pixel_size(data, pixel_size_nm)
    everything = prepare_labelled(data, normalisation=normalisation, pixel_size_nm=model_px)
    if val_dirs is not None:
        val_set = prepare_labelled(load_labelled(*val_dirs), normalisation=normalisation, pixel_size_nm=model_px)
        return everything, val_set, model_px, \
            f"{len(val_set.names)} images from {relative_path(val_dirs[0], val_dirs[0].parent)}"
    train_names, val_names = validation_split(everything.names, val_fraction, seed)
    val_source = (f"{len(val_names)} images of {len({series_of(n) for n in val_names})} series held out "
                  f"(fraction {val_fraction}, seed {seed})"
                  if val_names else "none (trained on every image for a fixed number of steps)")
    return everything.subset(train_names), everything.subset(val_names), model_px, val_source


def _train_and_export(out_dir: Path, train_set: PreparedSet, val_set: PreparedSet, config: UNetTrainingConfig, *,
                      extra_set: PreparedSet | None, dataset: Path, resume: bool,
                      progress: bool) -> tuple[list[str], dict[str, Any]]:
    """Train (resumably, through ``out_dir/checkpoint.safetensors``), score and export the net."""
    log.info("training %s on %d images (%d validation, %d train-only extra), model pixel size %s nm",
             config.architecture, len(train_set.names), len(val_set.names), len(extra_set.names) if extra_set else 0,
             train_set.pixel_size_nm)
    checkpoint = out_dir / "checkpoint.safetensors"
    validation = (val_set.images, val_set.masks) if val_set.names else None
    result = train_unet((train_set.images, train_set.masks), validation, config, progress=progress,
                        checkpoint=checkpoint, resume=resume, desc=f"training {config.architecture}",
                        extra=(extra_set.images, extra_set.masks) if extra_set else None)
    metrics: dict[str, Any] = {**_run_summary(result), "config": recorded_config(config, dataset),
                               "n_train_images": len(train_set.names),
                               "train_foreground_fraction": round(train_set.foreground_fraction, 5)}
    if val_set.names:
        pooled, _ = evaluate_net(result.net, val_set)
        metrics["validation"] = {**segmentation_metrics(pooled), "n_images": len(val_set.names),
                                 "images": val_set.names}
    files, metrics["onnx_parity"] = export_segmentation(out_dir, result.net, config,
                                                        val_set.images or train_set.images)
    checkpoint.unlink(missing_ok=True)
    return files, metrics


def build_labelled_profile(
    out_dir: Path,
    *,
    name: str,
    images_dir: Path,
    labels_dir: Path,
    config: UNetTrainingConfig,
    normalisation: Normalisation,
    pixel_size_nm: float | str | None,
    command: str,
    val_fraction: float = 0.15,
    val_dirs: tuple[Path, Path] | None = None,
    foreground: str = "particle",
    description: str = "",
    isolation: dict | None = None,
    archive: dict | None = None,
    cross_validation: Sequence[dict] = (),
    resume: bool = False,
    progress: bool = True,
    extra: ExtraData | None = None,
) -> Manifest:
    """Train a segmentation-only profile (no classifier) on labelled images and write it.

    Parameters
    ----------
    images_dir, labels_dir
        Images in any readable format and masks (non-zero = ``foreground``) paired by stem.
    pixel_size_nm
        Model sampling: a number, ``"none"`` (never resample), or ``None`` for the images' own.
    val_fraction, val_dirs
        Validation images for early stopping and the reported metrics: whole series held out
        from ``images_dir`` (``val_fraction``; 0 trains on everything for exactly
        ``config.max_steps`` steps), or a separate ``(images, labels)`` pair of folders.
    cross_validation
        Outputs of `cross_validate` to record in the manifest (command, settings, per-fold and
        pooled metrics; per-image entries are left out): the one of this architecture as
        ``training.cross_validation``, others (variants compared) as ``cross_validation_<arch>``.
    extra
        Train-only images (e.g. simulated frames) mixed into the training crops, never validated
        on (`prepare_extra`).
    resume
        Continue from ``out_dir/checkpoint.safetensors`` if an interrupted run left one.

    Examples
    --------
    >>> build_labelled_profile(Path("profiles/graphene"), name="graphene", images_dir=Path("data/images"),
    ...                        labels_dir=Path("data/labels"), config=UNetTrainingConfig(architecture="fpn",
    ...                        widths=(8, 16, 32, 64), augment="rotate"), normalisation="bezier_zscore",
    ...                        pixel_size_nm="none", command="latticewatch train ...")  # doctest: +SKIP
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, val_set, model_px, val_source = _labelled_sets(
        images_dir, labels_dir, normalisation=normalisation, pixel_size_nm=pixel_size_nm, val_fraction=val_fraction,
        val_dirs=val_dirs, seed=config.seed)
    extra_set, extra_source = (prepare_extra(extra, normalisation=normalisation, pixel_size_nm=model_px,
                                             progress=progress) if extra else (None, ""))
    dataset = images_dir.parent
    files, metrics = _train_and_export(out_dir, train_set, val_set, config, extra_set=extra_set, dataset=dataset,
                                       resume=resume, progress=progress)
    sampling = f"{model_px} nm/px" if model_px else "pixel size unknown, no resampling"
    data = (f"{len(train_set.names)} labelled images from {relative_path(images_dir, dataset)} "
            f"(labels {relative_path(labels_dir, dataset)}), {sampling}, {normalisation} normalisation; "
            f"validation: {val_source}" + (f"; train-only extra: {extra_source}" if extra_set else ""))
    training = {"segmentation": {"command": command, "metrics": metrics, "data": data},
                **_cross_validation_entries(cross_validation, config.architecture)}
    fields = {key: value for key, value in (("isolation", isolation), ("archive", archive)) if value is not None}
    return _write_profile(
        out_dir, files, name=name,
        description=description or f"{config.architecture} segmentation of {foreground}, trained on labelled images "
                                   f"from {relative_path(images_dir, dataset)}.",
        segmentation=segmentation_entry(config, files, pixel_size_nm=model_px, normalisation=normalisation,
                                        foreground=foreground),
        classifier=None, training=training, **fields,
    )
