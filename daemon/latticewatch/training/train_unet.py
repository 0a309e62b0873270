"""U-Net training (torch): cross-entropy + Dice loss, Adam, validation-based early stopping."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.nn import functional as F
from tqdm import tqdm

from latticewatch.models.unet import UNet
from latticewatch.training.datasets import random_dihedral

log = logging.getLogger("latticewatch.training.train_unet")


@dataclass
class UNetTrainingConfig:
    widths: tuple[int, ...] = (4, 8, 16, 32)
    crop: int = 256
    batch_size: int = 8
    learning_rate: float = 1e-4  # peak; cosine-decayed to 1/20 of it by max_steps
    max_steps: int = 2000
    eval_every: int = 100
    patience: int = 8  # evaluations without a Dice gain of at least min_delta
    min_delta: float = 1e-3
    seed: int = 0
    threads: int | None = None


@dataclass
class TrainingResult:
    net: UNet
    best_dice: float
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.softmax(logits, dim=1)[:, 1]
    inter = (prob * target).sum()
    return 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)


def dice_score(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
    """Dice over all pixels of a set (as the papers report it)."""
    pred = prob >= threshold
    truth = mask.astype(bool)
    denom = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / denom) if denom else 1.0


def predict_set(net: UNet, images: np.ndarray, batch: int = 4) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i : i + batch, None])
            out.append(net(x)[:, 1].numpy())
    return np.concatenate(out)


def train_unet(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    config: UNetTrainingConfig,
    *,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> TrainingResult:
    """Train on random augmented crops; keep the weights with the best validation Dice.

    With ``checkpoint`` the best weights so far are also saved there (safetensors) at every
    improvement, so an interrupted run leaves its best model behind.
    """
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    images, masks = train
    net = UNet(config.widths)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    # decaying the rate steadies batch-norm statistics late in training, so validation Dice stops swinging
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=config.max_steps, eta_min=config.learning_rate / 20)
    best, best_state, stale, history = -1.0, None, 0, []
    start = time.perf_counter()
    h, w = images.shape[1:]
    bar = tqdm(range(1, config.max_steps + 1), desc="training U-Net", disable=not progress, unit="step")
    step = 0
    for step in bar:
        net.train()
        xb, yb = [], []
        for _ in range(config.batch_size):
            i = int(rng.integers(len(images)))
            r, c = int(rng.integers(h - config.crop + 1)), int(rng.integers(w - config.crop + 1))
            x, y = random_dihedral(rng, images[i, r : r + config.crop, c : c + config.crop], masks[i, r : r + config.crop, c : c + config.crop])
            xb.append(x.copy())
            yb.append(y.copy())
        x = torch.from_numpy(np.stack(xb)[:, None])
        y = torch.from_numpy(np.stack(yb).astype(np.int64))
        logits = net.logits(x)
        loss = F.cross_entropy(logits, y) + dice_loss(logits, y.float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % config.eval_every == 0:
            dice = dice_score(predict_set(net, val[0]), val[1])
            last_loss = loss.item()
            history.append({"step": step, "loss": last_loss, "val_dice": dice})
            bar.set_postfix(loss=f"{last_loss:.3f}", val_dice=f"{dice:.3f}")
            log.info("step %d: loss %.4f, validation Dice %.4f", step, last_loss, dice)
            if dice > best + config.min_delta:
                best, stale = dice, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                if checkpoint is not None:
                    save_file(best_state, str(checkpoint), metadata={"step": str(step), "val_dice": f"{dice:.5f}"})
            else:
                stale += 1
                if stale >= config.patience:
                    log.info("early stop at step %d: no validation gain in %d evaluations", step, stale)
                    break
    if best_state is not None:
        net.load_state_dict(best_state)
    return TrainingResult(net.eval(), best, step, time.perf_counter() - start, history)
