"""Build a complete profile directory (ONNX + safetensors + skops + manifest) from synthetic data."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import skops.io as sio
from safetensors.torch import save_file

from latticewatch import __version__
from latticewatch.frame import CLASSES
from latticewatch.models.backends.onnxruntime import OnnxRuntimeBackend
from latticewatch.models.export import export_onnx, torch_probability
from latticewatch.models.manifest import Manifest, sha256_of
from latticewatch.stages.features import FEATURE_NAMES
from latticewatch.training.datasets import synthetic_segmentation_set
from latticewatch.training.train_forest import forest_metrics, synthetic_region_features, train_forest
from latticewatch.training.train_unet import UNetTrainingConfig, dice_score, predict_set, train_unet

log = logging.getLogger("latticewatch.training.profile")

#: Largest ONNX-vs-reference probability difference accepted when a trained model is exported.
#: Random-weight networks agree to < 1e-4 (tested); trained ones reach ~2e-4 at a few uncertain
#: pixels (p ≈ 0.4–0.5) because the max-normalised input is far from zero-mean and batch norm
#: cancels that offset, which amplifies float32 summation-order differences between ONNX Runtime's
#: and torch's convolutions (torch float32 itself sits 6e-5 from the float64 reference).
PARITY_TOLERANCE = 5e-4


def onnx_parity(net, onnx_path: Path, images: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ONNX Runtime against the float64 torch reference on ``images``: worst and 99.99th-percentile
    absolute probability difference, and the fraction of pixels whose decision flips."""
    backend = OnnxRuntimeBackend(onnx_path)
    diffs, flips = [], 0
    for image in images:
        ours, reference = backend.predict(image[None, None])[0, 0], torch_probability(net, image)
        diffs.append(np.abs(ours - reference).ravel())
        flips += int(np.count_nonzero((ours >= threshold) != (reference >= threshold)))
    diff = np.concatenate(diffs)
    return {"max_abs_diff": float(diff.max()), "p99_99_abs_diff": float(np.percentile(diff, 99.99)), "decision_flip_fraction": flips / diff.size}


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
    """Train the U-Net and the forest on fresh analytic frames and write a verified profile."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_val = max(4, n_frames // 10)
    train = synthetic_segmentation_set(n_frames, config.seed, pixel_size_nm=pixel_size_nm, progress=progress)
    val = synthetic_segmentation_set(n_val, config.seed + 1, pixel_size_nm=pixel_size_nm, progress=progress)
    result = train_unet(train, val, config, progress=progress, checkpoint=out_dir / "checkpoint.safetensors")

    val_prob = predict_set(result.net, val[0])
    seg_metrics = {"val_dice": round(dice_score(val_prob, val[1]), 4), "n_val_frames": n_val, "steps": result.steps,
                   "seconds": round(result.seconds, 1), "history": result.history}
    save_file(result.net.state_dict(), str(out_dir / "unet.safetensors"), metadata={"widths": json.dumps(list(config.widths))})
    (out_dir / "checkpoint.safetensors").unlink(missing_ok=True)
    export_onnx(result.net, out_dir / "unet.onnx")
    seg_metrics["onnx_parity"] = onnx_parity(result.net, out_dir / "unet.onnx", val[0][:4])
    if seg_metrics["onnx_parity"]["max_abs_diff"] > PARITY_TOLERANCE:
        raise RuntimeError(f"ONNX export differs from torch: {seg_metrics['onnx_parity']} (> {PARITY_TOLERANCE})")

    X, y = synthetic_region_features(n_regions_per_class, config.seed + 2, pixel_size_nm=pixel_size_nm, progress=progress)
    X_test, y_test = synthetic_region_features(max(20, n_regions_per_class // 4), config.seed + 3, pixel_size_nm=pixel_size_nm, progress=progress)
    forest = train_forest(X, y, seed=config.seed)
    forest.n_jobs = 1  # inference runs single-threaded inside the pipeline
    # 500 full-depth trees are ~33 MB raw; deflate brings them to ~5 MB
    sio.dump(forest, out_dir / "forest.skops", compression=zipfile.ZIP_DEFLATED, compresslevel=9)

    files = ["unet.onnx", "unet.safetensors", "forest.skops"]
    manifest = Manifest(
        name=name,
        version=__version__,
        description="Nanoparticle particle/background U-Net (Groschner et al. 2021 architecture) and 5-class "
        "stacking-fault forest, trained on latticewatch's analytic HRTEM generator.",
        files={f: sha256_of(out_dir / f) for f in files},
        segmentation={"onnx": "unet.onnx", "weights": "unet.safetensors", "widths": config.widths,
                      "pixel_size_nm": pixel_size_nm, "normalisation": "max", "threshold": 0.5},
        classifier={"skops": "forest.skops", "classes": CLASSES, "features": FEATURE_NAMES},
        training={
            "segmentation": {"command": command, "data": f"analytic generator, {n_frames} train + {n_val} validation 512² frames at {pixel_size_nm} nm/px, seed {config.seed}",
                             "metrics": {**seg_metrics, "config": asdict(config)}},
            "classifier": {"command": command, "data": f"analytic generator, {n_regions_per_class} regions per class (+ {len(y_test)} held out)",
                           "metrics": forest_metrics(forest, X_test, y_test)},
        },
    )
    (out_dir / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest
