"""Train a profile's region CNN (``classifier.kind = "cnn"``) on region crops, and measure it honestly.

Crops come from a crops index (``DIR/crops/index.csv`` of `latticewatch simulate`) or the analytic
generator. Each is preprocessed with the profile's own preprocessing (resampled to the segmentation's
pixel size, 3×3 median, its normalisation) and kept with its mask at that sampling; the network's
inputs are made by `latticewatch.stages.crops.classifier_input` only, as at inference. Source images
are split three ways (never one image on two sides): *train* (weights), *validation* (early stopping,
the ``uncertain_below`` threshold, the ``defect_confusion`` counts) and *test* (every reported score,
the per-condition tables, the defect-fraction series). Training draws classes equally often and
augments by the eight 90° turns and flips, and by small shifts of the window.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latticewatch.errors import ConfigError, InputError
from latticewatch.frame import CLASSES
from latticewatch.models.architectures import build_classifier
from latticewatch.models.manifest import (
    Manifest,
    read_manifest,
    relative_path,
    sha256_of,
    update_manifest,
    write_manifest,
)
from latticewatch.stages.crops import CropSpec, classifier_input
from latticewatch.stages.preprocess import preprocess, resample
from latticewatch.training.assess.classifier_metrics import (
    classification_metrics,
    condition_tables,
    defect_confusion,
    particle_conditions,
    predicted_labels,
)
from latticewatch.training.fit.classifier import crops_dataset, read_index_crops, split_by_image

log = logging.getLogger(__name__)


@dataclass
class CropSet:
    """Region crops at the model's sampling: image, boolean mask, class index, source image, conditions."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    y: np.ndarray
    groups: np.ndarray
    conditions: list[dict[str, Any]]
    source: str
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CnnTrainingConfig:
    """One CNN training run (the options of ``train-classifier --kind cnn``)."""

    architecture: str = "crop-cnn"
    spec: CropSpec = CropSpec()
    steps: int = 3000
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    eval_every: int = 200
    shift_px: int = 6
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    target_accuracy: float = 0.92
    min_coverage: float = 0.6
    seed: int = 0
    threads: int | None = None
    noise_crops: int = 0  # lattice-free noise crops of class empty added to the training images only


def model_crop(pixels: np.ndarray, mask: np.ndarray, pixel_size_nm: float | None,
               manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """A crop and its mask at the profile's sampling, preprocessed as the analyser preprocesses a frame.

    >>> from latticewatch_nanoparticles import profile_dir
    >>> image, region = model_crop(np.ones((64, 64)), np.ones((64, 64), bool), 0.025, read_manifest(profile_dir))
    >>> image.shape, region.shape
    ((32, 32), (32, 32))
    """
    seg = manifest.segmentation
    pre = preprocess(np.asarray(pixels), pixel_size_nm, normalisation=seg.normalisation,
                     model_pixel_size_nm=seg.pixel_size_nm)
    region = np.asarray(mask, bool)
    if pre.scale != 1.0:
        # the mask resampled as the image was (same shape), then the pixels at least half inside
        region = resample(region.astype(np.float32), pixel_size_nm / seg.pixel_size_nm) >= 0.5
    if region.shape != pre.image.shape:
        raise InputError(f"mask {region.shape} does not match the crop {pre.image.shape} at the model's pixel size")
    if not region.any():
        raise InputError("the region mask is empty at the model's pixel size")
    return pre.image, region


def crops_from_index(index: Path, manifest: Manifest, *, progress: bool = False) -> CropSet:
    """Every readable crop of ``index`` at the model's sampling; the others are skipped and listed."""
    described, skipped = read_index_crops(
        index, lambda pixels, mask, px: model_crop(pixels, mask, px, manifest), progress=progress)
    dataset = crops_dataset(index)
    return CropSet([image for _, (image, _) in described], [region for _, (_, region) in described],
                   np.array([CLASSES.index(row.label) for row, _ in described]),
                   np.array([row.image for row, _ in described]),
                   [particle_conditions(dataset, row.image, row.instance) for row, _ in described],
                   f"crops index {relative_path(index, dataset)}", skipped)


def synthetic_crops(n_per_class: int, seed: int, manifest: Manifest, *, size_px: int = 128) -> CropSet:
    """``n_per_class`` analytic region crops per class, each its own source image, at the model's sampling."""
    from latticewatch.testing.synthetic.frames import generate_region

    rng = np.random.default_rng(seed)
    pixel_size = manifest.segmentation.pixel_size_nm or 0.05
    out = CropSet([], [], np.zeros(0, int), np.zeros(0, str), [],
                  f"analytic generator, {n_per_class} regions per class, seed {seed}")
    y = []
    for name in [c for c in CLASSES for _ in range(n_per_class)]:
        sample = generate_region(rng, name, size_px=size_px, pixel_size_nm=pixel_size)
        image, region = model_crop(sample.image, sample.mask > 0, pixel_size, manifest)
        out.images.append(image)
        out.masks.append(region)
        out.conditions.append({})
        y.append(CLASSES.index(name))
    out.y, out.groups = np.array(y), np.array([f"synthetic_{i:05d}" for i in range(len(y))])
    return out


def noise_crops(n: int, seed: int, size_px: int = 128) -> CropSet:
    """``n`` lattice-free crops of class ``empty`` with blob masks: white, smoothed, low-count and
    gradient noise and near-flat frames, median filtered and standardised as preprocessing leaves a frame.

    What a segmentation hands the classifier on a frame it does not understand; without them a CNN
    that only saw carbon and particles calls blobs of noise "no stacking fault".

    >>> crops = noise_crops(4, 0, size_px=64)
    >>> len(crops.images), set(crops.y.tolist()), crops.images[0].shape
    (4, {4}, (64, 64))
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size_px, :size_px]
    out = CropSet([], [], np.full(n, CLASSES.index("empty")), np.array([f"noise_{i:05d}" for i in range(n)]),
                  [{} for _ in range(n)], f"{n} lattice-free noise crops, seed {seed}")
    for kind in rng.integers(5, size=n):
        if kind == 0:
            image = rng.uniform(size=(size_px, size_px))
        elif kind == 1:
            image = ndimage.gaussian_filter(rng.normal(size=(size_px, size_px)), rng.uniform(0.5, 3))
        elif kind == 2:
            image = rng.poisson(rng.uniform(0.5, 20), size=(size_px, size_px)).astype(float)
        elif kind == 3:
            image = (yy * rng.normal() + xx * rng.normal()) / size_px + rng.normal(scale=rng.uniform(0.05, 1),
                                                                                size=(size_px, size_px))
        else:
            image = 1 + rng.normal(scale=1e-3, size=(size_px, size_px))
        image = ndimage.median_filter(image.astype(np.float32), size=3)
        out.images.append(((image - image.mean()) / (image.std() + 1e-6)).astype(np.float32))
        cy, cx = rng.uniform(0.35, 0.65, 2) * size_px
        ry, rx = rng.uniform(0.08, 0.3, 2) * size_px
        out.masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    return out


def with_training_extra(crops: CropSet, train: np.ndarray, extra: CropSet) -> tuple[CropSet, np.ndarray]:
    """``crops`` with ``extra`` appended, and ``train`` extended by the new rows (validation and test
    stay the simulated images only)."""
    start = len(crops.y)
    merged = CropSet(crops.images + extra.images, crops.masks + extra.masks, np.concatenate([crops.y, extra.y]),
                     np.concatenate([crops.groups, extra.groups]), crops.conditions + extra.conditions,
                     f"{crops.source} + {extra.source} (training only)", crops.skipped)
    return merged, np.concatenate([train, np.arange(start, start + len(extra.y))])


def crop_input(crops: CropSet, i: int, spec: CropSpec, rng: np.random.Generator | None = None,
               shift_px: int = 0) -> np.ndarray:
    """The network input of crop ``i``; with ``rng``, turned/flipped (one of 8) and shifted by ≤ ``shift_px``."""
    image, mask = crops.images[i], crops.masks[i]
    if rng is not None:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
    rows, cols = np.nonzero(mask)
    centre = (rows.mean(), cols.mean())
    if rng is not None and shift_px:
        centre = (centre[0] + rng.integers(-shift_px, shift_px + 1), centre[1] + rng.integers(-shift_px, shift_px + 1))
    return classifier_input(image, mask, centre, spec)


def split_three(crops: CropSet, config: CnnTrainingConfig) -> dict[str, np.ndarray]:
    """Row indices of train / validation / test, no source image on two sides (classes stratified)."""
    rest, test = split_by_image(crops.y, crops.groups, config.test_fraction, config.seed)
    inner_fraction = config.val_fraction / (1 - config.test_fraction)
    train, val = split_by_image(crops.y[rest], crops.groups[rest], inner_fraction, config.seed + 1)
    return {"train": rest[train], "validation": rest[val], "test": test}


def predict(net: nn.Module, crops: CropSet, rows: np.ndarray, spec: CropSpec, batch: int = 128) -> np.ndarray:
    """Class probabilities (n, n_classes) of the crops ``rows``, untransformed, as inference sees them."""
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            x = np.stack([crop_input(crops, i, spec) for i in rows[start:start + batch]])
            out.append(net(torch.from_numpy(x)).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def _balanced_batch(rng: np.random.Generator, by_class: list[np.ndarray], size: int) -> np.ndarray:
    classes = rng.integers(len(by_class), size=size)
    return np.array([by_class[c][rng.integers(by_class[c].size)] for c in classes])


def fit_cnn(crops: CropSet, train: np.ndarray, val: np.ndarray, config: CnnTrainingConfig, *,
            progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train with balanced class sampling and augmentation; keep the weights of the best validation
    balanced accuracy (checked every ``eval_every`` steps). Returns the net and its history."""
    from tqdm import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = build_classifier(config.architecture, len(config.spec.channels), len(CLASSES))
    by_class = [train[crops.y[train] == c] for c in range(len(CLASSES)) if np.any(crops.y[train] == c)]
    missing = sorted(set(range(len(CLASSES))) - set(crops.y[train].tolist()))
    if missing:
        log.warning("no training crops of %s: the CNN cannot learn them", [CLASSES[c] for c in missing])
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.learning_rate, total_steps=config.steps,
                                                   pct_start=0.1)
    best = (-1.0, 0, {k: v.clone() for k, v in net.state_dict().items()})
    history = []
    bar = tqdm(range(1, config.steps + 1), desc="cnn", unit="step", disable=not progress)
    for step in bar:
        net.train()
        rows = _balanced_batch(rng, by_class, config.batch_size)
        x = torch.from_numpy(np.stack([crop_input(crops, i, config.spec, rng, config.shift_px) for i in rows]))
        loss = nn.functional.cross_entropy(net.logits(x), torch.from_numpy(crops.y[rows]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % config.eval_every == 0 or step == config.steps:
            score = _validation_score(net, crops, val, config.spec)
            history.append({"step": step, "loss": loss.item(), "val_balanced_accuracy": score})
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{score:.3f}")
            if score > best[0]:
                best = (score, step, {k: v.clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    return net.eval(), {"history": history, "best_step": best[1], "best_val_balanced_accuracy": best[0]}


def _validation_score(net: nn.Module, crops: CropSet, val: np.ndarray, spec: CropSpec) -> float:
    if not val.size:
        return 0.0
    return classification_metrics(crops.y[val], predict(net, crops, val, spec), None)["balanced_accuracy"]


def choose_uncertain_below(y: np.ndarray, probabilities: np.ndarray, *, target: float = 0.92,
                           min_coverage: float = 0.6) -> tuple[float | None, str]:
    """The threshold of the largest probability below which a particle is ``uncertain``.

    The lowest threshold at which the SF-vs-no-SF balanced accuracy of the labelled particles reaches
    ``target``, if that keeps ``min_coverage`` of them; else the one with the best such accuracy at that
    coverage; None when abstaining does not help. Returns it and the rule that chose it.

    >>> p = np.array([[0.9, 0.1, 0, 0, 0], [0.45, 0.4, 0.15, 0, 0], [0.1, 0.9, 0, 0, 0], [0.2, 0.8, 0, 0, 0]])
    >>> choose_uncertain_below(np.array([0, 1, 1, 1]), p, target=0.99, min_coverage=0.5)[0]
    0.5
    """
    def score(t: float | None) -> tuple[float, float]:
        m = classification_metrics(y, probabilities, t)
        return m["sf_vs_nosf_balanced_accuracy"] or 0.0, m["sf_vs_nosf_coverage"] or 0.0

    base, _ = score(None)
    candidates = [(t, *score(t)) for t in np.round(np.arange(0.25, 0.96, 0.05), 2).tolist()]
    feasible = [c for c in candidates if c[2] >= min_coverage]
    reaching = [c for c in feasible if c[1] >= target]
    if base >= target:
        return None, f"SF-vs-no-SF balanced accuracy {base:.3f} ≥ {target} without abstaining"
    if reaching:
        t = reaching[0]
        return t[0], f"lowest threshold reaching SF-vs-no-SF balanced accuracy {target} on the validation images"
    best = max(feasible, key=lambda c: c[1], default=None)
    if best is None or best[1] <= base:
        return None, "abstaining does not improve the validation SF-vs-no-SF balanced accuracy"
    return best[0], f"best validation SF-vs-no-SF balanced accuracy with coverage ≥ {min_coverage}"


@dataclass(frozen=True)
class CnnResult:
    manifest: Manifest
    metrics: dict[str, Any]
    skipped: tuple[str, ...]


def train_cnn_classifier(out: Path, crops: CropSet, config: CnnTrainingConfig, *, command: str = "",
                         progress: bool = False) -> CnnResult:
    """Train, choose ``uncertain_below`` and the confusion on validation images, test on the others, and
    write ``cnn.onnx`` + ``cnn.safetensors`` and the manifest's CNN classifier section into profile ``out``.

    Examples
    --------
    >>> crops = synthetic_crops(20, 0, read_manifest(Path("profiles/np")))  # doctest: +SKIP
    >>> result = train_cnn_classifier(Path("profiles/np"), crops, CnnTrainingConfig(steps=50))  # doctest: +SKIP
    >>> result.metrics["test"]["n"]  # doctest: +SKIP
    20
    """
    from latticewatch.training.assess.defect_series import SeriesSpec, defect_series

    out = Path(out)
    read_manifest(out)  # refuse a directory that is not a verified profile before training
    if config.steps < 1 or config.batch_size < 1:
        raise ConfigError(f"steps and batch size must be positive, got {config.steps} and {config.batch_size}")
    split = split_three(crops, config)
    if config.noise_crops:
        noise = noise_crops(config.noise_crops, config.seed, 2 * config.spec.size_px)
        crops, split["train"] = with_training_extra(crops, split["train"], noise)
    net, fit = fit_cnn(crops, split["train"], split["validation"], config, progress=progress)
    val_p = predict(net, crops, split["validation"], config.spec)
    threshold, rule = choose_uncertain_below(crops.y[split["validation"]], val_p, target=config.target_accuracy,
                                             min_coverage=config.min_coverage)
    confusion = defect_confusion(crops.y[split["validation"]], predicted_labels(val_p, threshold),
                                 f"validation images of {crops.source}")
    test_p = predict(net, crops, split["test"], config.spec)
    y_test = crops.y[split["test"]]
    metrics: dict[str, Any] = {
        "architecture": config.architecture, "spec": config.spec.model_dump(mode="json"),
        "test": classification_metrics(y_test, test_p, threshold),
        "validation": classification_metrics(crops.y[split["validation"]], val_p, threshold),
        "uncertain_below_rule": rule,
        "tables": condition_tables(y_test, test_p, threshold, [crops.conditions[i] for i in split["test"]]),
        **_split_summary(crops, split, config), **fit,
    }
    try:
        metrics["defect_series"] = defect_series(y_test, predicted_labels(test_p, threshold), confusion,
                                                 SeriesSpec(seed=config.seed))
    except ValueError as err:  # a tiny test set without both SF and no-SF particles
        metrics["defect_series"] = {"skipped": str(err)}
    metrics["balanced_accuracy"] = metrics["test"]["balanced_accuracy"]
    manifest = _write_cnn(out, net, config, threshold, confusion, metrics, command, crops.source)
    return CnnResult(manifest, metrics, tuple(crops.skipped))


def _split_summary(crops: CropSet, split: dict[str, np.ndarray], config: CnnTrainingConfig) -> dict[str, Any]:
    def counts(rows: np.ndarray) -> dict[str, int]:
        return {CLASSES[c]: int(n) for c, n in zip(*np.unique(crops.y[rows], return_counts=True))}

    return {
        "split": "by source image (stratified group folds): train / validation / test",
        **{f"n_{name}": int(rows.size) for name, rows in split.items()},
        **{f"n_images_{name}": len(set(crops.groups[rows].tolist())) for name, rows in split.items()},
        "train_class_counts": counts(split["train"]), "test_class_counts": counts(split["test"]),
        "steps": config.steps, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
        "seed": config.seed, "augmentation": f"8 dihedral turns/flips, shifts ≤ {config.shift_px} px",
        "sampling": "classes drawn equally often",
    }


def _write_cnn(out: Path, net: nn.Module, config: CnnTrainingConfig, threshold: float | None, confusion,
               metrics: dict[str, Any], command: str, data: str) -> Manifest:
    """Export and save the net, then update the manifest (files, classifier section, training record)."""
    from safetensors.torch import save_file

    from latticewatch.io.atomic import atomic_path
    from latticewatch.models.export import export_classifier_onnx

    def change(m: dict[str, Any]) -> None:
        m["files"].update(digests)
        m["classifier"] = {"kind": "cnn", "onnx": "cnn.onnx", "weights": "cnn.safetensors", "classes": list(CLASSES),
                           "input": config.spec.model_dump(mode="json"), "uncertain_below": threshold,
                           "defect_confusion": None if confusion is None else confusion.model_dump(mode="json")}
        m["training"]["classifier"] = {"command": command, "data": data, "metrics": _finite(metrics)}

    # the new files wait under temporary names while the profile as it was (a previous CNN's files
    # included) is verified and the change validated; the manifest is written once they are in place
    with atomic_path(out / "cnn.onnx") as onnx, atomic_path(out / "cnn.safetensors") as weights:
        export_classifier_onnx(net, onnx, channels=len(config.spec.channels), size_px=config.spec.size_px)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        digests = {"cnn.onnx": sha256_of(onnx), "cnn.safetensors": sha256_of(weights)}
        updated = update_manifest(out, change, dry_run=True)
    return write_manifest(out, updated)


def _finite(value: Any) -> Any:
    """JSON-safe metrics: NaN and infinities (e.g. an empty bin's error) become None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["CnnTrainingConfig", "CropSet", "choose_uncertain_below", "crop_input", "crops_from_index", "fit_cnn",
           "model_crop", "predict", "split_three", "synthetic_crops", "train_cnn_classifier"]
