"""Build a complete profile directory (ONNX + safetensors [+ skops] + manifest), from synthetic
frames (`build_synthetic_profile`) or from labelled micrographs on disk (`build_labelled_profile`).

Both share `export_segmentation` (weights, ONNX, parity check against the float64 reference) and
`write_manifest` (sha256 of every file, validation through the pydantic `Manifest`).
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import skops.io as sio
from safetensors.torch import save_file
from torch import nn

from latticewatch import __version__
from latticewatch.frame import CLASSES
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.export import export_onnx, torch_probability
from latticewatch.models.manifest import Manifest, sha256_of
from latticewatch.stages.features import FEATURE_NAMES
from latticewatch.stages.preprocess import Normalisation
from latticewatch.training.data.augment import synthetic_segmentation_set
from latticewatch.training.data.labelled import load_labelled, series_of
from latticewatch.training.assess.metrics import PixelCounts, segmentation_metrics
from latticewatch.training.data.supervised import PreparedSet, prepare_labelled, resolve_pixel_size, validation_split
from latticewatch.training.fit.forest import forest_metrics, synthetic_region_features, train_forest
from latticewatch.training.fit.unet import TrainingResult, UNetTrainingConfig, dice_score, predict_images, train_unet

log = logging.getLogger("latticewatch.training.fit.profile")

#: Largest ONNX-vs-reference probability difference accepted when a trained model is exported.
#: Random-weight networks agree to < 1e-4 (tested); trained ones reach ~2e-4 at a few uncertain
#: pixels (p ≈ 0.4–0.5) because the max-normalised input is far from zero-mean and batch norm
#: cancels that offset, which amplifies float32 summation-order differences between ONNX Runtime's
#: and torch's convolutions (torch float32 itself sits 6e-5 from the float64 reference).
PARITY_TOLERANCE = 5e-4


def onnx_parity(net, onnx_path: Path, images: Sequence[np.ndarray], threshold: float = 0.5) -> dict[str, float]:
    """ONNX Runtime against the float64 torch reference on ``images`` (sides divisible by the
    net's divisor): worst and 99.99th-percentile absolute probability difference, and the
    fraction of pixels whose decision flips."""
    backend = OnnxRuntimeBackend(onnx_path)
    diffs, flips = [], 0
    for image in images:
        ours, reference = backend.predict(np.asarray(image, np.float32)[None, None])[0, 0], torch_probability(net, image)
        diffs.append(np.abs(ours - reference).ravel())
        flips += int(np.count_nonzero((ours >= threshold) != (reference >= threshold)))
    diff = np.concatenate(diffs)
    return {"max_abs_diff": float(diff.max()), "p99_99_abs_diff": float(np.percentile(diff, 99.99)), "decision_flip_fraction": flips / diff.size}


def _divisible_crops(images: Sequence[np.ndarray], divisor: int, n: int = 4) -> list[np.ndarray]:
    """Up to ``n`` images cut down to multiples of ``divisor`` (the ONNX model's input rule)."""
    out = []
    for image in images[:n]:
        h, w = (s // divisor * divisor for s in image.shape)
        if h and w:
            out.append(np.ascontiguousarray(image[:h, :w]))
    return out


def export_segmentation(out_dir: Path, net: nn.Module, config: UNetTrainingConfig, parity_images: Sequence[np.ndarray]) -> tuple[list[str], dict]:
    """Write ``<arch>.safetensors`` and ``<arch>.onnx`` (``unet.*`` for the U-Net) and check the
    ONNX model against the float64 torch reference on ``parity_images``.

    Returns the file names and the parity figures; raises ``RuntimeError`` beyond `PARITY_TOLERANCE`.
    """
    stem = config.architecture
    weights, onnx = f"{stem}.safetensors", f"{stem}.onnx"
    save_file(net.state_dict(), str(out_dir / weights),
              metadata={"architecture": config.architecture, "widths": json.dumps(list(config.widths))})
    export_onnx(net, out_dir / onnx)
    parity = onnx_parity(net, out_dir / onnx, _divisible_crops(parity_images, net.divisor))
    if parity["max_abs_diff"] > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch: {parity} (> {PARITY_TOLERANCE})")
    return [onnx, weights], parity


def segmentation_entry(config: UNetTrainingConfig, files: list[str], *, pixel_size_nm: float | None, normalisation: Normalisation,
                       foreground: str = "particle", threshold: float = 0.5) -> dict[str, Any]:
    """The manifest's ``segmentation`` section for a net trained with ``config``."""
    return {"onnx": files[0], "weights": files[1], "architecture": config.architecture, "widths": config.widths,
            "pixel_size_nm": pixel_size_nm, "normalisation": normalisation, "threshold": threshold, "foreground": foreground}


def write_manifest(out_dir: Path, files: Sequence[str], **fields: Any) -> Manifest:
    """Validate and write ``manifest.json`` listing the sha256 of ``files`` (all in ``out_dir``)."""
    manifest = Manifest(version=__version__, files={f: sha256_of(out_dir / f) for f in files}, **fields)
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _run_summary(result: TrainingResult) -> dict[str, Any]:
    return {"steps": result.steps, "best_step": result.best_step, "seconds": round(result.seconds, 1), "history": result.history}


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
    """Train the segmentation net and the forest on fresh analytic frames and write a verified profile."""
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

    X, y = synthetic_region_features(n_regions_per_class, config.seed + 2, pixel_size_nm=pixel_size_nm, progress=progress)
    X_test, y_test = synthetic_region_features(max(20, n_regions_per_class // 4), config.seed + 3, pixel_size_nm=pixel_size_nm, progress=progress)
    forest = train_forest(X, y, seed=config.seed)
    forest.n_jobs = 1  # inference runs single-threaded inside the pipeline
    # 500 full-depth trees are ~33 MB raw; deflate brings them to ~5 MB
    sio.dump(forest, out_dir / "forest.skops", compression=zipfile.ZIP_DEFLATED, compresslevel=9)

    return write_manifest(
        out_dir, [*files, "forest.skops"],
        name=name,
        description="Nanoparticle particle/background U-Net (Groschner et al. 2021 architecture) and 5-class "
        "stacking-fault forest, trained on latticewatch's analytic HRTEM generator.",
        segmentation=segmentation_entry(config, files, pixel_size_nm=pixel_size_nm, normalisation="max"),
        classifier={"skops": "forest.skops", "classes": CLASSES, "features": FEATURE_NAMES},
        training={
            "segmentation": {"command": command, "data": f"analytic generator, {n_frames} train + {n_val} validation 512² frames at {pixel_size_nm} nm/px, seed {config.seed}",
                             "metrics": {**seg_metrics, "config": asdict(config)}},
            "classifier": {"command": command, "data": f"analytic generator, {n_regions_per_class} regions per class (+ {len(y_test)} held out)",
                           "metrics": forest_metrics(forest, X_test, y_test)},
        },
    )


def evaluate_net(net: nn.Module, data: PreparedSet, threshold: float = 0.5) -> tuple[PixelCounts, list[PixelCounts]]:
    """Pooled and per-image confusion counts of ``net`` on a prepared set."""
    per_image = [PixelCounts.of(p >= threshold, m) for p, m in zip(predict_images(net, data.images), data.masks)]
    return sum(per_image, PixelCounts()), per_image


def _cv_for_manifest(cv: dict) -> dict:
    """A cross-validation result without its bulky per-image entries (the manifest stays readable)."""
    from latticewatch.training.assess.cross_validation import content_ratio_spearman

    out = {k: v for k, v in cv.items() if k not in ("command", "data")}
    model = dict(out["model"])
    if "content_ratio_spearman" not in model:
        model["content_ratio_spearman"] = content_ratio_spearman(cv)
    model["per_fold"] = [{k: v for k, v in f.items() if k != "per_image"} for f in model["per_fold"]]
    out["model"] = model
    return out


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
    data = load_labelled(images_dir, labels_dir)
    model_px = resolve_pixel_size(data, pixel_size_nm)
    everything = prepare_labelled(data, normalisation=normalisation, pixel_size_nm=model_px)
    if val_dirs is not None:
        train_set = everything
        val_set = prepare_labelled(load_labelled(*val_dirs), normalisation=normalisation, pixel_size_nm=model_px)
        val_source = f"{len(val_set.names)} images from {val_dirs[0]}"
    else:
        train_names, val_names = validation_split(everything.names, val_fraction, config.seed)
        train_set, val_set = everything.subset(train_names), everything.subset(val_names)
        val_source = (f"{len(val_names)} images of {len({series_of(n) for n in val_names})} series held out (fraction {val_fraction}, seed {config.seed})"
                      if val_names else "none (trained on every image for a fixed number of steps)")
    log.info("training %s on %d images (%d validation), model pixel size %s nm", config.architecture, len(train_set.names),
             len(val_set.names), model_px)
    checkpoint = out_dir / "checkpoint.safetensors"
    result = train_unet((train_set.images, train_set.masks), (val_set.images, val_set.masks) if val_set.names else None, config,
                        progress=progress, checkpoint=checkpoint, resume=resume, desc=f"training {config.architecture}")
    metrics: dict[str, Any] = {**_run_summary(result), "config": asdict(config), "n_train_images": len(train_set.names),
                               "train_foreground_fraction": round(train_set.foreground_fraction, 5)}
    if val_set.names:
        pooled, _ = evaluate_net(result.net, val_set)
        metrics["validation"] = {**segmentation_metrics(pooled), "n_images": len(val_set.names), "images": val_set.names}
    files, metrics["onnx_parity"] = export_segmentation(out_dir, result.net, config, (val_set.images or train_set.images))
    checkpoint.unlink(missing_ok=True)
    sampling = f"{model_px} nm/px" if model_px else "pixel size unknown, no resampling"
    training = {"segmentation": {"command": command, "metrics": metrics,
                                 "data": f"{len(train_set.names)} labelled images from {images_dir} (labels {labels_dir}), {sampling}, "
                                         f"{normalisation} normalisation; validation: {val_source}"}}
    for cv in cross_validation:
        key = "cross_validation" if cv.get("architecture") == config.architecture and "cross_validation" not in training \
            else "cross_validation_" + str(cv.get("architecture", "other")).replace("-", "_")
        training[key] = {"command": cv.get("command", ""), "data": cv.get("data", ""), "metrics": _cv_for_manifest(cv)}
    fields: dict[str, Any] = {}
    if isolation is not None:
        fields["isolation"] = isolation
    if archive is not None:
        fields["archive"] = archive
    return write_manifest(
        out_dir, files, name=name,
        description=description or f"{config.architecture} segmentation of {foreground}, trained on labelled images from {images_dir}.",
        segmentation=segmentation_entry(config, files, pixel_size_nm=model_px, normalisation=normalisation, foreground=foreground),
        classifier=None, training=training, **fields,
    )
