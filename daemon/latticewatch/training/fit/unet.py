"""Segmentation-net training (torch): cross-entropy + Dice loss, Adam, validation-based early
stopping, resumable safetensors checkpoints.

Any architecture of ``models.architectures`` trains here (the name is historical: the U-Net came
first). Images may differ in size: each step draws ``batch_size`` random crops, augmented either
by the dihedral group (``augment="dihedral"``: 90° turns and flips, exact for the synthetic
lattices) or by arbitrary rotations and flips (``augment="rotate"``), optionally rescaled
(``scale_jitter``) and photometrically randomised (``intensity_augment``). A run may start from a
profile's weights (``init``, `load_init_weights`) and mix train-only extra images into its crops.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from latticewatch.errors import ModelError
from latticewatch.io.atomic import atomic_path
from latticewatch.models.architectures import build_net
from latticewatch.models.manifest import read_manifest, relative_path
from latticewatch.runtime.plugins import discover_profiles
from latticewatch.stages.preprocess import pad_to_multiple
from latticewatch.training.assess.metrics import PixelCounts, pooled_dice
from latticewatch.training.data.augment import random_dihedral, random_intensity, random_rotation_crop
from latticewatch.training.data.supervised import PreparedSet

log = logging.getLogger(__name__)

#: Images or masks: an (N, H, W) array or a sequence of 2-D arrays (of any sizes).
ImageSet = np.ndarray | Sequence[np.ndarray]

#: Training state that must match for a checkpoint to be resumed (the rest may change, e.g. steps).
_RESUME_KEYS = ("architecture", "widths", "crop", "batch_size", "learning_rate", "max_steps", "seed", "augment",
                "scale_jitter", "intensity_augment", "extra_fraction", "init")


@dataclass
class UNetTrainingConfig:
    """Settings of one training run (recorded in the manifest).

    ``max_steps`` also sets the cosine learning-rate schedule, so a run stopped early by patience
    has not yet decayed its rate fully; ``eval_every`` steps the validation Dice is measured, the
    best weights kept and the checkpoint written.
    """

    widths: tuple[int, ...] = (4, 8, 16, 32)
    architecture: str = "unet"
    crop: int = 256
    batch_size: int = 8
    learning_rate: float = 1e-4  # peak; cosine-decayed to 1/20 of it by max_steps
    max_steps: int = 2000
    eval_every: int = 100
    patience: int = 8  # evaluations without a Dice gain of at least min_delta
    min_delta: float = 1e-3
    seed: int = 0
    threads: int | None = None
    augment: str = "dihedral"  # or "rotate"
    scale_jitter: float = 0.0  # "rotate" only: rescale crops by a factor in [1/(1+j), 1+j]
    intensity_augment: bool = False  # photometric randomisation of each crop (`random_intensity`)
    extra_fraction: float = 0.5  # share of crops drawn from the train-only extra images, when given
    init: str | None = None  # start from these weights (see `load_init_weights`) instead of random ones


@dataclass
class TrainingResult:
    net: nn.Module
    best_dice: float | None  # None when trained without a validation set
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    best_step: int | None = None


class CheckpointError(ModelError, ValueError):
    """A checkpoint that cannot be resumed with the given settings."""


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss of the foreground softmax against a 0/1 target (smoothed by 1 for empty crops).

    >>> round(float(dice_loss(torch.tensor([[[[-9.0]], [[9.0]]]]), torch.ones(1, 1, 1))), 4)
    0.0
    """
    prob = torch.softmax(logits, dim=1)[:, 1]
    inter = (prob * target).sum()
    return 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)


def dice_score(prob: ImageSet, mask: ImageSet, threshold: float = 0.5) -> float:
    """Dice over all pixels of a set (as the papers report it).

    >>> dice_score([np.array([[0.9, 0.2]])], [np.array([[True, False]])])
    1.0
    """
    return pooled_dice((p >= threshold for p in prob), mask)


def predict_images(net: nn.Module, images: Sequence[np.ndarray], batch: int = 4) -> list[np.ndarray]:
    """Foreground probability of each 2-D image (any size: mirror-padded to ``net.divisor``)."""
    net.eval()
    out: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(np.shape(image), []).append(i)
    with torch.no_grad():
        for members in by_shape.values():
            for start in range(0, len(members), batch):
                chunk = members[start : start + batch]
                padded = [pad_to_multiple(np.asarray(images[i], np.float32), net.divisor) for i in chunk]
                x = torch.from_numpy(np.stack([p for p, _ in padded])[:, None])
                probs = net(x)[:, 1].numpy()
                for i, prob, (_, (h, w)) in zip(chunk, probs, padded):
                    out[i] = prob[:h, :w]
    return out  # type: ignore[return-value]


def _random_crop(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, crop: int, augment: str,
                 scale_jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    if augment == "rotate":
        return random_rotation_crop(rng, image, mask, crop, scale_jitter)
    h, w = image.shape
    if h < crop or w < crop:  # small image: mirror it out to the crop size
        pad = ((0, max(0, crop - h)), (0, max(0, crop - w)))
        image, mask = np.pad(image, pad, mode="symmetric"), np.pad(mask, pad, mode="symmetric")
        h, w = image.shape
    r, c = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    x, y = random_dihedral(rng, image[r : r + crop, c : c + crop], mask[r : r + crop, c : c + crop])
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def init_weights_path(source: str | Path) -> Path:
    """The safetensors file of ``source``: itself (a ``.safetensors`` file), the segmentation
    weights of a profile directory, or those of an installed profile of that name.

    Raises
    ------
    CheckpointError
        ``source`` is none of these.

    Examples
    --------
    >>> init_weights_path("nanoparticles").name
    'unet.safetensors'
    """
    path = Path(source)
    if path.suffix == ".safetensors":
        return path
    if (path / "manifest.json").is_file():
        return path / read_manifest(path).segmentation.weights
    # a same-named folder without a manifest (e.g. this run's --out) must not hide an installed profile
    entry = discover_profiles().get(str(source))
    if entry is None or entry.directory is None:
        raise CheckpointError(f"{source}: neither a .safetensors file, a profile directory nor an installed profile")
    return entry.directory / read_manifest(entry.directory).segmentation.weights


def load_init_weights(net: nn.Module, source: str | Path) -> None:
    """Load a profile's weights into ``net`` to fine-tune from them (``source`` as in
    `init_weights_path`); the architecture and widths must match.

    Examples
    --------
    >>> load_init_weights(build_net("unet", (4, 8, 16, 32)), "nanoparticles")
    """
    path = init_weights_path(source)
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit this architecture/widths: "
                              f"{str(err).splitlines()[0]}") from err
    log.info("initialised from %s", path)


def _config_meta(config: UNetTrainingConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def recorded_config(config: UNetTrainingConfig, dataset: Path | None = None) -> dict:
    """``config`` as a manifest or a cross-validation result records it: tuples as lists, ``init``
    never a machine's absolute path (`relative_path`, ``dataset``: the folder of the data read).

    >>> recorded_config(UNetTrainingConfig(init="/data/profiles/np"), Path("/data/real"))["init"]
    'profiles/np'
    """
    meta = _config_meta(config)
    if config.init:
        meta["init"] = relative_path(config.init, dataset)
    return meta


@dataclass
class _Progress:
    """How far a run has got towards its best weights: what a checkpoint must carry besides tensors."""

    best: float = -1.0
    best_step: int | None = None
    best_state: dict | None = None
    stale: int = 0
    history: list[dict] = field(default_factory=list)

    def evaluate(self, step: int, loss: float, net: nn.Module, val: tuple[list, list], config: UNetTrainingConfig,
                 bar: tqdm) -> bool:
        """Record this evaluation (and keep the weights if validation Dice improved); True to stop early."""
        entry = {"step": step, "loss": round(loss, 5)}
        stop = False
        if val[0]:
            dice = dice_score(predict_images(net, val[0]), val[1])
            entry["val_dice"] = dice
            bar.set_postfix(loss=f"{loss:.3f}", val_dice=f"{dice:.3f}")
            log.info("step %d: loss %.4f, validation Dice %.4f", step, loss, dice)
            if dice > self.best + config.min_delta:
                self.best, self.best_step, self.stale = dice, step, 0
                self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                self.stale += 1
                stop = self.stale >= config.patience
        else:
            bar.set_postfix(loss=f"{loss:.3f}")
            log.info("step %d: loss %.4f", step, loss)
        self.history.append(entry)
        return stop


def _save_checkpoint(path: Path, *, net: nn.Module, progress: _Progress, optimiser, schedule, rng: np.random.Generator,
                     config: UNetTrainingConfig, step: int) -> None:
    """Everything needed to continue a run, as safetensors (tensors) + JSON metadata (never pickle)."""
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if progress.best_state is not None:
        tensors.update({f"best.{k}": v.clone().contiguous() for k, v in progress.best_state.items()})
    opt = optimiser.state_dict()
    for index, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "config": _config_meta(config), "step": step, "best": progress.best, "best_step": progress.best_step,
        "stale": progress.stale, "history": progress.history, "param_groups": opt["param_groups"],
        "schedule": schedule.state_dict(), "rng_numpy": rng.bit_generator.state,
    }
    with atomic_path(path) as tmp:  # a crash mid-write leaves the previous checkpoint intact
        save_file(tensors, str(tmp), metadata={"latticewatch_training": json.dumps(meta)})


def _load_checkpoint(path: Path, config: UNetTrainingConfig, net: nn.Module, optimiser, schedule,
                     rng: np.random.Generator) -> tuple[int, _Progress]:
    """Restore net, optimiser, schedule and random states; the step the checkpoint was written at."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        raw = (fh.metadata() or {}).get("latticewatch_training")
    if raw is None:
        raise CheckpointError(f"{path}: not a latticewatch training checkpoint (no training metadata)")
    meta = json.loads(raw)
    ours = _config_meta(config)
    changed = [k for k in _RESUME_KEYS if meta["config"].get(k) != ours.get(k)]
    if changed:
        raise CheckpointError(f"{path}: cannot resume, settings differ from the checkpoint's: "
                              + ", ".join(f"{k} {meta['config'].get(k)!r} → {ours.get(k)!r}" for k in changed))
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    schedule.load_state_dict(meta["schedule"])
    rng.bit_generator.state = meta["rng_numpy"]
    torch.set_rng_state(tensors["rng.torch"])
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta["step"], _Progress(meta["best"], meta["best_step"], best_state, meta["stale"], meta["history"])


def _as_lists(pair: tuple[ImageSet, ImageSet] | None) -> tuple[list, list]:
    """``(images, masks)`` as lists of float32 images and bool masks (empty lists for ``None``)."""
    if pair is None:
        return [], []
    return [np.asarray(x, np.float32) for x in pair[0]], [np.asarray(m).astype(bool) for m in pair[1]]


def _train_step(net: nn.Module, optimiser, schedule, rng: np.random.Generator, data: tuple[list, list],
                extra: tuple[list, list], config: UNetTrainingConfig) -> torch.Tensor:
    """One optimiser step on ``batch_size`` random augmented crops (a share ``extra_fraction`` of
    them from ``extra`` when it holds images); the batch's loss."""
    net.train()
    xb, yb = [], []
    for _ in range(config.batch_size):
        images, masks = data
        if extra[0] and (not images or rng.random() < config.extra_fraction):
            images, masks = extra
        i = int(rng.integers(len(images)))
        x, y = _random_crop(rng, images[i], masks[i], config.crop, config.augment, config.scale_jitter)
        if config.intensity_augment:
            x = random_intensity(rng, x)
        xb.append(x)
        yb.append(y)
    x = torch.from_numpy(np.stack(xb)[:, None])
    y = torch.from_numpy(np.stack(yb).astype(np.int64))
    logits = net.logits(x)
    loss = F.cross_entropy(logits, y) + dice_loss(logits, y.float())
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    return loss


def train_unet(
    train: tuple[ImageSet, ImageSet],
    val: tuple[ImageSet, ImageSet] | None,
    config: UNetTrainingConfig,
    *,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    until_step: int | None = None,
    desc: str = "training",
    extra: tuple[ImageSet, ImageSet] | None = None,
) -> TrainingResult:
    """Train on random augmented crops; keep the weights with the best validation Dice.

    Parameters
    ----------
    train, val
        ``(images, masks)``: preprocessed float32 images and boolean/0-1 masks, an (N, H, W) array
        or lists of 2-D arrays of any sizes. ``val=None`` trains for exactly ``max_steps`` and
        keeps the final weights (training on every labelled image, with the step count chosen by
        cross-validation).
    checkpoint
        Written every ``eval_every`` steps (model, best model, optimiser, schedule, random
        states); with ``resume=True`` an existing one is continued from.
    extra
        Train-only ``(images, masks)`` (e.g. simulated frames mixed with a few real ones): a share
        ``config.extra_fraction`` of the crops comes from them; never used for validation.
    until_step
        Stop after this step as if interrupted (the schedule still spans ``max_steps``), e.g. to
        train in sessions: a later call with ``resume=True`` continues exactly where this stopped.

    Examples
    --------
    >>> config = UNetTrainingConfig(crop=64, batch_size=2, max_steps=2, eval_every=1)
    >>> images, masks = np.random.rand(3, 64, 64).astype(np.float32), np.random.rand(3, 64, 64) > 0.5
    >>> result = train_unet((images[:2], masks[:2]), (images[2:], masks[2:]), config, progress=False)
    >>> result.steps, len(result.history)
    (2, 2)
    """
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    data, val_data, extra_data = _as_lists(train), _as_lists(val), _as_lists(extra)
    net = build_net(config.architecture, config.widths)
    if config.init:
        load_init_weights(net, config.init)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    # decaying the rate steadies batch-norm statistics late in training, so validation Dice stops swinging
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.max_steps,
                                                          eta_min=config.learning_rate / 20)
    run, step = _Progress(), 0
    if resume and checkpoint is not None and checkpoint.is_file():
        step, run = _load_checkpoint(checkpoint, config, net, optimiser, schedule, rng)
        log.info("resuming from %s at step %d (best validation Dice %.4f)", checkpoint, step + 1, run.best)
    start = time.perf_counter()
    last = min(config.max_steps, until_step or config.max_steps)
    bar = tqdm(range(step + 1, last + 1), desc=desc, disable=not progress, unit="step", initial=step,
               total=config.max_steps)
    for step in bar:
        loss = _train_step(net, optimiser, schedule, rng, data, extra_data, config)
        evaluate = step % config.eval_every == 0 or step == config.max_steps
        if not evaluate and step != last:
            continue
        stop = evaluate and run.evaluate(step, loss.item(), net, val_data, config, bar)
        # off the evaluation grid only when stopping at until_step: save without evaluating, so a
        # resumed run makes exactly the decisions an uninterrupted one would
        if checkpoint is not None:
            _save_checkpoint(checkpoint, net=net, progress=run, optimiser=optimiser, schedule=schedule, rng=rng,
                             config=config, step=step)
        if stop:
            log.info("early stop at step %d: no validation gain in %d evaluations", step, run.stale)
            break
    bar.close()
    if run.best_state is not None:
        net.load_state_dict(run.best_state)
    validated = bool(val_data[0])
    return TrainingResult(net.eval(), run.best if validated else None, step, time.perf_counter() - start, run.history,
                          run.best_step if validated else None)


def evaluate_net(net: nn.Module, data: PreparedSet, threshold: float = 0.5) -> tuple[PixelCounts, list[PixelCounts]]:
    """Pooled and per-image confusion counts of ``net`` on a prepared set.

    >>> pooled, per_image = evaluate_net(result.net, prepared.subset(test_names))  # doctest: +SKIP
    >>> segmentation_metrics(pooled)["dice"]  # doctest: +SKIP
    0.91
    """
    per_image = [PixelCounts.of(p >= threshold, m) for p, m in zip(predict_images(net, data.images), data.masks)]
    return sum(per_image, PixelCounts()), per_image
