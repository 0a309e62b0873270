"""``latticewatch calibrate domain``: the input statistics of the frames a profile was trained on, as the
reference its domain check compares every frame with (`latticewatch.stages.domain.InputReference`).

Each training frame is prepared exactly as the analyser prepares it (resampled to the model's pixel size,
median filtered, normalised) and described by `input_descriptor`; the reference is their mean and covariance,
shrunk towards its diagonal because a few dozen frames do not pin down a 15 × 15 covariance. The limit is
the largest leave-one-out distance among the training frames (each measured against the reference fitted
without it, as a new frame would be) times a margin: frames of the same kind that training never saw spread
wider than the training frames themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.errors import ConfigError
from latticewatch.models.manifest import MANIFEST_NAME, relative_path, update_manifest
from latticewatch.runtime.batch import Batch, Failure, micrograph_files
from latticewatch.stages.domain import DESCRIPTOR_FEATURES, InputReference, input_descriptor

log = logging.getLogger(__name__)

#: Covariance shrinkage towards the diagonal (0: sample covariance, 1: diagonal only).
DEFAULT_SHRINKAGE = 0.5
#: Limit = margin × the largest leave-one-out distance of a training frame.
DEFAULT_MARGIN = 2.0


def fit_reference(descriptors: np.ndarray, *, shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Mean and shrunk covariance of descriptors (one row per frame).

    >>> mean, cov = fit_reference(np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]]), shrinkage=1.0)
    >>> mean.tolist(), np.round(cov, 3).tolist()
    ([1.0, 2.0], [[1.0, 0.0], [0.0, 3.0]])
    """
    x = np.asarray(descriptors, np.float64)
    mean = x.mean(axis=0)
    sample = np.cov(x, rowvar=False)
    diagonal = np.diag(np.diag(sample))
    # a tiny ridge keeps features that never varied in training (a constant bin) invertible
    ridge = 1e-6 * max(float(np.trace(sample)) / len(mean), 1e-12) * np.eye(len(mean))
    return mean, (1 - shrinkage) * sample + shrinkage * diagonal + ridge


def _distances(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    delta = x - mean
    return np.sqrt(np.einsum("ij,jk,ik->i", delta, np.linalg.inv(covariance), delta))


def leave_one_out_distances(descriptors: np.ndarray, *, shrinkage: float = DEFAULT_SHRINKAGE) -> np.ndarray:
    """Each row's distance from the reference fitted on all the other rows.

    >>> d = leave_one_out_distances(np.random.default_rng(0).normal(size=(40, 3)))
    >>> d.shape, bool(d.min() > 0)
    ((40,), True)
    """
    x = np.asarray(descriptors, np.float64)
    out = np.empty(len(x))
    for i in range(len(x)):
        rest = np.delete(x, i, axis=0)
        out[i] = _distances(x[i : i + 1], *fit_reference(rest, shrinkage=shrinkage))[0]
    return out


@dataclass(frozen=True)
class DomainCalibration:
    reference: InputReference
    names: tuple[str, ...]  # the frames described, in order
    distances: np.ndarray  # each frame's distance from the full reference
    loo_distances: np.ndarray  # each frame's distance from the reference fitted without it
    skipped: tuple[Failure, ...]
    written: bool
    manifest_path: Path


def _frame_descriptors(analyser, images_dirs, pixel_size_nm, progress) -> tuple[list[str], list[np.ndarray], Batch]:
    files = [f for d in images_dirs for f in micrograph_files(Path(d))]
    if not files:
        raise FileNotFoundError(f"{', '.join(map(str, images_dirs))}: no micrographs")
    batch = Batch(progress=progress, desc="frames")

    def describe(frame):
        if frame.pixel_size_nm is None and pixel_size_nm is not None:
            frame = replace(frame, pixel_size_nm=pixel_size_nm)
        return input_descriptor(analyser.prepare(frame).pre.image)

    names, rows = [], []
    for frame, row in batch.run(files, describe):
        names.append(frame.frame_id)
        rows.append(row)
    return names, rows, batch


def calibrate_domain(
    profile: str | Path,
    images_dirs: list[Path],
    *,
    pixel_size_nm: float | None = None,
    n_synthetic: int = 0,
    synthetic_seed: int = 1000,
    margin: float = DEFAULT_MARGIN,
    shrinkage: float = DEFAULT_SHRINKAGE,
    dry_run: bool = False,
    command: str = "",
    progress: bool = False,
) -> DomainCalibration:
    """Describe the training frames of ``profile`` and write the reference into its manifest's ``domain``.

    ``images_dirs`` are folders of frames the profile was trained on (their pixel size from the files;
    ``pixel_size_nm`` for frames that have none); ``n_synthetic`` adds the analytic 256² frames that
    ``latticewatch train --extra-synthetic N`` mixed in (seed ``synthetic_seed``: the run's seed + 1000).
    The profile's ``training.domain_reference`` records the command and the distances.

    Examples
    --------
    >>> r = calibrate_domain("profiles/np", [Path("real/images")], n_synthetic=30)  # doctest: +SKIP
    >>> r.reference.limit  # doctest: +SKIP
    9.1
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.training.assess.calibrate.threshold import profile_directory
    from latticewatch.training.data.augment import synthetic_segmentation_set

    if not margin >= 1:
        raise ConfigError(f"--margin must be at least 1, got {margin}")
    if not 0 <= shrinkage <= 1:
        raise ConfigError(f"--shrinkage must be between 0 and 1, got {shrinkage}")
    directory = profile_directory(profile)
    analyser = Analyser(directory, threads=1)
    seg = analyser.manifest.segmentation
    names, rows, batch = _frame_descriptors(analyser, images_dirs, pixel_size_nm, progress)
    if n_synthetic:
        if not seg.pixel_size_nm:
            raise ConfigError("analytic frames need the model's pixel size, and this profile has none")
        images, _ = synthetic_segmentation_set(n_synthetic, synthetic_seed, shape=(256, 256),
                                               pixel_size_nm=seg.pixel_size_nm, normalisation=seg.normalisation,
                                               progress=False)
        names += [f"analytic_{i:04d}" for i in range(n_synthetic)]
        rows += [input_descriptor(image) for image in images]
    if len(rows) < 3:
        raise ConfigError(f"need at least 3 training frames for a reference, got {len(rows)}")
    x = np.array(rows)
    mean, covariance = fit_reference(x, shrinkage=shrinkage)
    loo = leave_one_out_distances(x, shrinkage=shrinkage)
    limit = round(float(margin * loo.max()), 3)
    reference = InputReference(mean=tuple(np.round(mean, 6).tolist()),
                               covariance=tuple(tuple(r) for r in np.round(covariance, 8).tolist()),
                               limit=limit, n_frames=len(x))
    distances = np.array([reference.distance(row) for row in x])
    log.info("domain reference from %d frames: leave-one-out max %.2f, limit %.2f", len(x), loo.max(), limit)

    def change(m: dict[str, Any]) -> None:
        m.setdefault("domain", {})["reference"] = reference.model_dump(mode="json")
        sources = [f"{len(micrograph_files(Path(d)))} files in {relative_path(d, Path(d).parent)}"
                   for d in images_dirs]
        if n_synthetic:
            sources.append(f"{n_synthetic} analytic 256² frames (seed {synthetic_seed})")
        m.setdefault("training", {})["domain_reference"] = {
            "command": command,
            "data": " + ".join(sources),
            "metrics": {"n_frames": len(x), "descriptor": list(DESCRIPTOR_FEATURES), "shrinkage": shrinkage,
                        "margin": margin, "loo_max": round(float(loo.max()), 4),
                        "loo_median": round(float(np.median(loo)), 4),
                        "in_sample_max": round(float(distances.max()), 4), "limit": limit},
        }

    update_manifest(directory, change, dry_run=dry_run)
    return DomainCalibration(reference, tuple(names), distances, loo, tuple(batch.failures), not dry_run,
                             directory / MANIFEST_NAME)
