"""Calibration of a profile and of an instrument.

* :func:`calibrate_threshold` — the decision threshold on the particle probability that
  maximises the Dice pooled over a labelled set, written into the profile manifest.
* :func:`calibrate_baselines` — fit the classical baselines once and store their parameters in
  the manifest, so ``latticewatch evaluate`` scores every data set with the same ones.
* :func:`measure_fringe_frequency` / :func:`calibrate_pixel_size` — the camera's pixel size at a
  magnification from the lattice fringes of a known crystal (e.g. Au (111), 0.2355 nm), written
  to an instrument calibration TOML (:mod:`latticewatch.calibration`).
* :func:`int8_calibration_set` — a small set of frames, preprocessed exactly as the analyser
  does, that spans the data (farthest-point sampling over simple statistics), for calibrating
  INT8 activation ranges of a TensorRT engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError
from scipy import fft as sfft
from scipy import ndimage

from latticewatch.io.atomic import write_atomic
from latticewatch.calibration import (
    MAGNIFICATION_TOLERANCE,
    CalibrationError,
    InstrumentCalibration,
    MagnificationStep,
    calibration_toml,
    load_calibration,
)
from latticewatch.models.manifest import Manifest, ManifestError, read_manifest
from latticewatch.training.assess.metrics import PixelCounts, counts_above, pooled_dice, segmentation_metrics
from latticewatch.errors import InputError

log = logging.getLogger("latticewatch.training.assess.calibrate")

#: Thresholds tried by ``calibrate threshold``.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.9501, 0.01), 2)


# ------------------------------------------------------------------------------------ manifest


def update_manifest(directory: Path, change: Callable[[dict[str, Any]], None], *, dry_run: bool = False) -> Manifest:
    """Apply ``change`` to the manifest's JSON, validate it, and write it atomically.

    The model files and their sha256 are not touched, so the profile stays verifiable; a change
    that makes the manifest invalid raises `ManifestError` and leaves the file as it was.
    """
    path = Path(directory) / "manifest.json"
    read_manifest(Path(directory))  # the profile must be intact before we touch it
    data = json.loads(path.read_text())
    change(data)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(f"{path}: the update would make the manifest invalid: {err}") from None
    if not dry_run:
        write_atomic(path, (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def profile_directory(profile: str | Path) -> Path:
    """The directory of a profile given by name or path (calibration writes into it)."""
    from latticewatch.runtime.plugins import resolve_profile

    return resolve_profile(str(profile))[0]


# ----------------------------------------------------------------------------------- threshold


def threshold_counts(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray], thresholds: np.ndarray):
    """Pooled confusion counts of ``p >= t`` for every ``t`` in (sorted) ``thresholds``.

    Returns
    -------
    list of PixelCounts
        One per threshold, summed over all images.
    """
    fg_above, bg_above, n_fg, n_bg = counts_above(probabilities, truths, np.asarray(thresholds, np.float64))
    return [PixelCounts(int(tp), int(fp), n_fg - int(tp), n_bg - int(fp)) for tp, fp in zip(fg_above, bg_above)]


@dataclass(frozen=True)
class ThresholdResult:
    old: float
    new: float
    dice_before: float
    dice_after: float
    n_images: int
    curve: list[tuple[float, float]]  # (threshold, pooled Dice)
    written: bool
    manifest_path: Path


def calibrate_threshold(
    profile: str | Path,
    images_dir: Path,
    labels_dir: Path,
    *,
    dry_run: bool = False,
    command: str = "",
    threads: int | None = None,
    progress: bool = False,
) -> ThresholdResult:
    """Choose the decision threshold (0.05–0.95, step 0.01) maximising pooled Dice; write it.

    The probability map is the one ``process`` computes (same analyser path as ``evaluate``).
    Both ``segmentation.threshold`` and ``isolation.threshold`` are set: the first is the
    network's pixel decision that ``evaluate`` scores, the second the one ``process`` isolates
    regions with, and they must not disagree. Ties go to the threshold nearest the old one.

    Examples
    --------
    >>> result = calibrate_threshold("profiles/np", Path("val/images"), Path("val/labels"))  # doctest: +SKIP
    >>> result.old, result.new, round(result.dice_after - result.dice_before, 3)  # doctest: +SKIP
    (0.5, 0.41, 0.012)
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.training.assess.evaluate import run_model
    from latticewatch.training.data.labelled import load_labelled

    directory = profile_directory(profile)
    analyser = Analyser(directory, threads=threads)
    old = analyser.manifest.segmentation.threshold
    data = load_labelled(Path(images_dir), Path(labels_dir))
    probabilities, truths = [], []
    for scored in run_model(analyser, data, progress=progress):
        probabilities.append(scored.probability)
        truths.append(scored.truth)
    counts = threshold_counts(probabilities, truths, THRESHOLD_GRID)
    dice = np.array([segmentation_metrics(c)["dice"] for c in counts])
    best = np.flatnonzero(dice >= dice.max() - 1e-12)
    new = float(THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - old))]])
    dice_before = pooled_dice([p >= old for p in probabilities], truths)
    dice_after = float(dice.max())

    def change(m: dict[str, Any]) -> None:
        m["segmentation"]["threshold"] = new
        m.setdefault("isolation", {})["threshold"] = new
        m.setdefault("training", {})["threshold"] = {
            "command": command,
            "data": f"{len(data)} labelled images in {images_dir} (labels {labels_dir})",
            "metrics": {"old": old, "new": new, "dice_before": round(dice_before, 6), "dice_after": round(dice_after, 6),
                        "n_images": len(data), "searched": [float(THRESHOLD_GRID[0]), float(THRESHOLD_GRID[-1]), 0.01]},
        }

    update_manifest(directory, change, dry_run=dry_run)
    return ThresholdResult(old, new, dice_before, dice_after, len(data), list(zip(THRESHOLD_GRID.tolist(), dice.tolist())),
                           not dry_run, directory / "manifest.json")


# ----------------------------------------------------------------------------------- baselines


def calibrate_baselines(
    profile: str | Path,
    images_dir: Path,
    labels_dir: Path,
    *,
    names: Sequence[str],
    dry_run: bool = False,
    command: str = "",
) -> dict[str, dict[str, Any]]:
    """Fit the named baselines on a labelled set (at the model's sampling) and store them.

    Returns the fitted parameters by name (as written to ``manifest.baselines``).
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.training.assess.evaluate import fit_baselines, prepared_images
    from latticewatch.training.data.labelled import load_labelled

    directory = profile_directory(profile)
    analyser = Analyser(directory)
    data = load_labelled(Path(images_dir), Path(labels_dir))
    images, masks = prepared_images(analyser, data)
    fitted = {name: b.to_dict() for name, b in fit_baselines(names, images, masks).items()}

    def change(m: dict[str, Any]) -> None:
        m.setdefault("baselines", {}).update(fitted)
        m.setdefault("training", {})["baselines"] = {
            "command": command,
            "data": f"{len(data)} labelled images in {images_dir} (labels {labels_dir})",
            "metrics": {name: {"fitted_dice": p["fitted_dice"]} for name, p in fitted.items()},
        }

    update_manifest(directory, change, dry_run=dry_run)
    return fitted


# -------------------------------------------------------------------------------- d-spacings


@dataclass(frozen=True)
class Crystal:
    """Lattice of a calibration standard (room-temperature lattice parameters, nm)."""

    structure: Literal["fcc", "diamond", "wurtzite", "hexagonal2d"]
    a: float
    c: float | None = None
    note: str = ""


#: Calibration crystals. ``latticewatch calibrate pixel-size --material`` accepts these names
#: (case-insensitive); any other crystal works with ``--lattice-nm``.
CRYSTALS: dict[str, Crystal] = {
    "Au": Crystal("fcc", 0.40782, note="gold"),
    "Ag": Crystal("fcc", 0.40853, note="silver"),
    "Pd": Crystal("fcc", 0.38907, note="palladium"),
    "Pt": Crystal("fcc", 0.39242, note="platinum"),
    "Cu": Crystal("fcc", 0.36149, note="copper"),
    "Si": Crystal("diamond", 0.543102, note="silicon"),
    "CdSe": Crystal("wurtzite", 0.4299, 0.7010, note="cadmium selenide, wurtzite"),
    "graphene": Crystal("hexagonal2d", 0.2461, note="graphene / graphite basal plane"),
}


def parse_reflection(text: str) -> tuple[int, ...]:
    """Miller indices from ``"111"``, ``"1-11"``, ``"(2,0,0)"`` or four-index ``"10-10"``.

    >>> parse_reflection("1-11"), parse_reflection("(2, 0, 0)"), parse_reflection("11-20")
    ((1, -1, 1), (2, 0, 0), (1, 1, -2, 0))
    """
    digits = re.findall(r"-?\d+" if "," in text or " " in text.strip() else r"-?\d", text)
    indices = tuple(int(d) for d in digits)
    if len(indices) not in (3, 4) or not any(indices):
        raise CalibrationError(f"reflection {text!r}: give three Miller indices (e.g. 111, 1-11, 2,0,0) or four (10-10)")
    return indices


def d_spacing(material: str, reflection: str) -> float:
    """Lattice-plane spacing (nm) of a reflection of a calibration crystal.

    Reflections the structure forbids (e.g. fcc 100, diamond 200, wurtzite 001) are refused:
    they do not show as fringes in a thin crystal, so a measurement would be of something else.

    Examples
    --------
    >>> round(d_spacing("Au", "111"), 4), round(d_spacing("Si", "111"), 4), round(d_spacing("CdSe", "100"), 4)
    (0.2355, 0.3136, 0.3723)
    >>> d_spacing("Au", "100")
    Traceback (most recent call last):
    ...
    latticewatch.calibration.CalibrationError: Au (100) is a forbidden reflection of fcc; allowed low-index ones: 111, 200, 220, 311, 222
    """
    names = {k.lower(): k for k in CRYSTALS}
    key = names.get(material.lower())
    if key is None:
        raise CalibrationError(f"unknown material {material!r}; known: {', '.join(CRYSTALS)} (or give --lattice-nm)")
    crystal = CRYSTALS[key]
    hkl = parse_reflection(reflection)
    if crystal.structure in ("fcc", "diamond"):
        if len(hkl) != 3:
            raise CalibrationError(f"{key} is cubic: give three Miller indices, not {reflection!r}")
        if not _allowed(crystal.structure, hkl):
            allowed = [f"{h}{k}{l}" for h, k, l in _low_index(crystal.structure)]
            raise CalibrationError(f"{key} ({reflection}) is a forbidden reflection of {crystal.structure}; "
                                   f"allowed low-index ones: {', '.join(allowed)}")
        return crystal.a / math.sqrt(sum(i * i for i in hkl))
    if len(hkl) == 4:
        h, k, i, l = hkl
        if i != -(h + k):
            raise CalibrationError(f"reflection {reflection!r}: in four-index notation i must equal −(h+k)")
    else:
        h, k, l = hkl
    if crystal.structure == "hexagonal2d":
        if l:
            raise CalibrationError(f"{key} is a single layer: only (hk0) reflections, not {reflection!r}")
        inverse_d2 = 4 / 3 * (h * h + h * k + k * k) / crystal.a**2
    else:
        if l % 2 and (h - k) % 3 == 0:
            raise CalibrationError(f"{key} ({reflection}) is forbidden in wurtzite (l odd with h−k = 3n)")
        inverse_d2 = 4 / 3 * (h * h + h * k + k * k) / crystal.a**2 + l * l / crystal.c**2
    return 1.0 / math.sqrt(inverse_d2)


def _allowed(structure: str, hkl: tuple[int, ...]) -> bool:
    parity = {i % 2 for i in hkl}
    if len(parity) != 1:
        return False  # fcc: h, k, l unmixed
    return not (structure == "diamond" and parity == {0} and sum(hkl) % 4 == 2)


def _low_index(structure: str) -> list[tuple[int, int, int]]:
    families = [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0)]
    return [f for f in families if _allowed(structure, f)][:5]


# ------------------------------------------------------------------------ fringe measurement

#: Largest central square analysed (pixels); 1024² zero-padded to 2048² resolves 0.05 % of a
#: typical fringe frequency, far below the 1 % a magnification calibration needs.
MAX_MEASURE_SIDE = 1024
#: A spot whose power (3×3 mean) is this many times its ring's median is a lattice reflection.
#: White noise reaches ~20 in a 2048² padded spectrum (neighbouring bins of a windowed,
#: zero-padded transform are correlated, so the mean does not tame the extremes); the
#: reflections of a calibration crystal are hundreds to thousands.
SPOT_CONTRAST = 60.0


class FringeError(InputError):
    """No lattice fringes found where they were looked for."""


@dataclass(frozen=True)
class FringeMeasurement:
    """Measured fringe frequency of a calibration image.

    Attributes
    ----------
    frequency
        Spatial frequency of the fringes in cycles per pixel (1 / period).
    method
        ``"spots"`` (sub-pixel centroids of the reflections: single crystals) or ``"ring"``
        (radial power-spectrum profile: many randomly oriented crystals).
    n_spots
        Reflections averaged (a centro-symmetric pair counts two).
    contrast
        Spot power over its ring's median, or ring over its surroundings.
    spread
        Relative standard deviation of the individual spots' frequencies (0 for a ring).
    """

    frequency: float
    method: str
    n_spots: int
    contrast: float
    spread: float

    @property
    def period_px(self) -> float:
        return 1.0 / self.frequency


_YY, _XX = (a.ravel().astype(np.float64) for a in np.mgrid[-2:3, -2:3])
_QUADRATIC = np.column_stack([np.ones(25), _XX, _YY, _XX**2, _YY**2, _XX * _YY])


def _vertex_2d(window: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx) of the maximum of a 5×5 window: least-squares quadratic surface.

    Twenty-five samples average the shot noise of the spectrum, which three-point parabolas
    along each axis do not; a surface that is not a cap (or a vertex outside the window)
    falls back to the centre pixel.
    """
    _, b, c, d, e, f = np.linalg.lstsq(_QUADRATIC, window.ravel(), rcond=None)[0]
    hessian = np.array([[2 * d, f], [f, 2 * e]])
    if not (hessian[0, 0] < 0 and np.linalg.det(hessian) > 0):
        return 0.0, 0.0
    dx, dy = np.linalg.solve(hessian, [-b, -c])
    return (float(dy), float(dx)) if max(abs(dx), abs(dy)) <= 2 else (0.0, 0.0)


def _parabolic(lm: float, l0: float, lp: float) -> float:
    """Offset (−0.5..0.5) of the vertex of a parabola through three equally spaced samples."""
    den = lm - 2 * l0 + lp
    return 0.0 if den >= 0 else float(np.clip(0.5 * (lm - lp) / den, -0.5, 0.5))


def measure_fringe_frequency(image: np.ndarray, *, frequency_range: tuple[float, float] = (0.02, 0.5)) -> FringeMeasurement:
    """Lattice-fringe frequency (cycles/pixel) of an image, from its power spectrum.

    The central square (at most :data:`MAX_MEASURE_SIDE`) is Hann-windowed and zero-padded to
    twice its side. Each Fourier pixel is divided by the median power of its ring (radius), which
    flattens the 1/f background and Thon rings of the carbon and leaves lattice reflections as
    isolated spikes. If the strongest spike in ``frequency_range`` is at least
    :data:`SPOT_CONTRAST` times its ring, the reflections at the same radius (±2 %) are refined
    to sub-pixel by a least-squares quadratic surface through the log power around each, and
    their radii averaged (weighted by strength). Otherwise (rings of many small crystals) the
    centroid of the excess power of the ring-normalised radial profile is used.

    Examples
    --------
    >>> yy, xx = np.mgrid[:256, :256]
    >>> fringes = 100 + 10 * np.cos(2 * np.pi * (0.6 * xx + 0.8 * yy) / 7.3)
    >>> round(measure_fringe_frequency(fringes).period_px, 2)
    7.3
    """
    x = np.asarray(image, np.float64)
    if x.ndim != 2 or min(x.shape) < 32:
        raise FringeError(f"need a 2-D image of at least 32×32 pixels, got shape {x.shape}")
    n = min(min(x.shape), MAX_MEASURE_SIDE)
    r0, c0 = (x.shape[0] - n) // 2, (x.shape[1] - n) // 2
    x = x[r0 : r0 + n, c0 : c0 + n]
    x = (x - x.mean()) * (np.hanning(n)[:, None] * np.hanning(n)[None, :])
    size = 2 * n
    power = np.abs(sfft.fft2(x, s=(size, size), workers=-1)) ** 2
    k = sfft.fftfreq(size)
    radius = np.hypot(k[:, None], k[None, :])
    ring = np.rint(radius * size).astype(np.intp)
    n_rings = int(ring.max()) + 1
    ring_median = np.asarray(ndimage.median(power, labels=ring, index=np.arange(n_rings)), np.float64)
    ring_median = np.maximum(ring_median, 1e-300)
    lo, hi = frequency_range
    inside = (radius >= lo) & (radius <= min(hi, 0.5))
    if not inside.any():
        raise FringeError(f"frequency range {lo}–{hi} cycles/pixel is empty")
    # 3×3 mean of the ring-normalised power: a reflection spans a few bins, a noise spike one
    contrast = ndimage.uniform_filter(power / ring_median[ring], 3, mode="wrap")
    peak = np.unravel_index(int(np.argmax(np.where(inside, contrast, -np.inf))), power.shape)
    best = float(contrast[peak])
    if best >= SPOT_CONTRAST:
        r_peak = float(radius[peak])
        local_max = (contrast == ndimage.maximum_filter(contrast, size=5, mode="wrap")) & inside
        candidates = local_max & (np.abs(radius - r_peak) <= 0.02 * r_peak) & (contrast >= 0.2 * best)
        log_power = np.log(np.maximum(ndimage.uniform_filter(power, 3, mode="wrap"), 1e-300))
        frequencies, weights = [], []
        for r, c in zip(*np.nonzero(candidates)):
            window = log_power.take(np.arange(r - 2, r + 3), axis=0, mode="wrap").take(np.arange(c - 2, c + 3), axis=1, mode="wrap")
            dy, dx = _vertex_2d(window)
            frequencies.append(math.hypot(k[r] + dy / size, k[c] + dx / size))
            weights.append(contrast[r, c])
        f = np.array(frequencies)
        mean = float(np.average(f, weights=weights))
        return FringeMeasurement(mean, "spots", len(f), best, float(f.std() / mean))
    profile = np.bincount(ring.ravel(), weights=power.ravel(), minlength=n_rings) / np.maximum(np.bincount(ring.ravel(), minlength=n_rings), 1)
    background = ndimage.median_filter(profile, size=max(9, n_rings // 16 * 2 + 1), mode="nearest")
    normalised = profile / np.maximum(background, 1e-300)
    bins = np.arange(n_rings) / size
    usable = (bins >= lo) & (bins <= min(hi, 0.5))
    usable[[0, -1]] = False
    i = int(np.argmax(np.where(usable, normalised, -np.inf)))
    if normalised[i] < 1.5:
        raise FringeError(f"no lattice fringes found between {lo} and {hi} cycles/pixel "
                          f"(strongest reflection {best:.1f}× its ring, strongest ring {normalised[i]:.2f}× its surroundings)")
    # Rings of small crystals are tens of bins wide and sit on a sloping background, so the
    # vertex of three bins is biased; the centroid of the power above the background, summed
    # over each ring (× r undoes the ring mean's 1/r), over the peak's upper half is not.
    excess = (profile - background) * np.arange(n_rings)
    top = excess[i]
    a, b = i, i
    while a > 1 and excess[a - 1] > 0.5 * top:
        a -= 1
    while b < n_rings - 2 and excess[b + 1] > 0.5 * top:
        b += 1
    if b - a >= 2:
        r = np.arange(a, b + 1)
        centre = float(np.sum(r * excess[a : b + 1]) / np.sum(excess[a : b + 1]))
    else:
        centre = i + _parabolic(*np.log(normalised[i - 1 : i + 2]))
    return FringeMeasurement(centre / size, "ring", 0, float(normalised[i]), 0.0)


@dataclass(frozen=True)
class PixelSizeResult:
    pixel_size_nm: float
    d_nm: float
    measurement: FringeMeasurement
    header_pixel_size_nm: float | None
    calibration: InstrumentCalibration
    replaced: float | None  # pixel size previously stored at this magnification
    warnings: tuple[str, ...]


def calibrate_pixel_size(
    image_path: Path,
    *,
    material: str,
    reflection: str | None,
    lattice_nm: float | None,
    camera: str,
    magnification: float,
    voltage_kv: float | None,
    out: Path,
    instrument: str | None = None,
    near_nm_per_px: float | None = None,
    binning: int = 1,
    dry_run: bool = False,
) -> PixelSizeResult:
    """Measure nm/pixel from a calibration image and add (or replace) the magnification step.

    A new file needs ``instrument``; an existing one must be for the same camera, voltage and
    binning (a calibration is only valid for those). The file is validated before it replaces
    the old one, atomically. Its leading comment lines are kept.

    Examples
    --------
    >>> calibrate_pixel_size(Path("au_620kx.mrc"), material="Au", reflection="111", lattice_nm=None,
    ...                      camera="OneView", magnification=620000, voltage_kv=300,
    ...                      out=Path("calibration/team1.toml"), instrument="TEAM I")  # doctest: +SKIP
    """
    from latticewatch.io.readers import read_frames

    if lattice_nm is not None:
        if lattice_nm <= 0:
            raise CalibrationError(f"--lattice-nm must be positive, got {lattice_nm}")
        d = float(lattice_nm)
        if reflection and material.lower() in {k.lower() for k in CRYSTALS}:
            table = d_spacing(material, reflection)
            if abs(table / d - 1) > 0.02:
                log.warning("--lattice-nm %.4f differs from the table's %s (%s) %.4f nm", d, material, reflection, table)
    else:
        if not reflection:
            raise CalibrationError("give --reflection (e.g. 111) or the spacing itself with --lattice-nm")
        d = d_spacing(material, reflection)
    frame = next(iter(read_frames(image_path)))
    frange = (0.02, 0.5)
    if near_nm_per_px:
        expected = near_nm_per_px / d  # cycles/pixel
        frange = (expected / 1.25, min(0.5, expected * 1.25))
    measurement = measure_fringe_frequency(frame.pixels, frequency_range=frange)
    pixel_size = d * measurement.frequency
    warnings: list[str] = []
    if measurement.period_px < 3:
        warnings.append(f"fringe period {measurement.period_px:.2f} px is close to Nyquist: use a higher magnification or a larger spacing")
    if measurement.method == "spots" and measurement.spread > 0.01:
        warnings.append(f"reflections disagree by {100 * measurement.spread:.1f} %: distorted image, mixed reflections, or astigmatism")

    step = MagnificationStep(
        magnification=magnification, pixel_size_nm=round(pixel_size, 6),
        source=f"{material} ({reflection or '?'}) fringes, d = {d:.5f} nm, {measurement.method}, "
               f"period {measurement.period_px:.3f} px; {image_path.name}; latticewatch calibrate pixel-size {date.today().isoformat()}",
    )
    comments: list[str] = []
    replaced = None
    if out.exists():
        existing = load_calibration(out)
        problems = [f"{name} {old!r} ≠ {new!r}" for name, old, new in (
            ("camera", existing.camera, camera), ("voltage_kv", existing.voltage_kv, voltage_kv), ("binning", existing.binning, binning))
            if new is not None and old is not None and old != new]
        if problems:
            raise CalibrationError(f"{out}: calibrated for other conditions ({'; '.join(problems)}); write a separate file")
        kept = []
        for s in existing.steps:
            if abs(magnification / s.magnification - 1) < MAGNIFICATION_TOLERANCE:
                replaced = s.pixel_size_nm
            else:
                kept.append(s)
        data = existing.model_dump()
        data["steps"] = [s.model_dump() for s in kept] + [step.model_dump()]
        if instrument and instrument != existing.instrument:
            raise CalibrationError(f"{out}: is for instrument {existing.instrument!r}, not {instrument!r}")
        for line in out.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            comments.append(line)
    else:
        if not instrument:
            raise CalibrationError(f"{out} does not exist yet: give --instrument to create it")
        data = {"instrument": instrument, "camera": camera, "voltage_kv": voltage_kv, "binning": binning,
                "source": "lattice fringes of known crystals, measured with latticewatch calibrate pixel-size; see each step",
                "steps": [step.model_dump()]}
        comments = [f"# Instrument calibration written by latticewatch calibrate pixel-size ({date.today().isoformat()})."]
    data["steps"] = sorted(data["steps"], key=lambda s: s["magnification"])
    try:
        calibration = InstrumentCalibration.model_validate(data)
    except ValidationError as err:
        raise CalibrationError(f"{out}: {err}") from None
    ordered = sorted(calibration.steps, key=lambda s: s.magnification)
    if any(a.pixel_size_nm <= b.pixel_size_nm for a, b in zip(ordered, ordered[1:])):
        warnings.append("pixel size does not fall with magnification across the steps: check the magnification values")
    text = calibration_toml(calibration, comments)
    if load_calibration_text(text, out) != calibration:  # what we write must read back the same
        raise CalibrationError(f"{out}: internal error, TOML does not round-trip")
    if not dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text.encode("utf-8"))
    return PixelSizeResult(pixel_size, d, measurement, frame.pixel_size_nm, calibration, replaced, tuple(warnings))


def load_calibration_text(text: str, path: Path) -> InstrumentCalibration:
    import tomllib

    try:
        return InstrumentCalibration.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise CalibrationError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------ INT8 frame set

INT8_STATS = ("mean", "std", "coverage")


def farthest_points(features: np.ndarray, n: int) -> list[int]:
    """``n`` row indices spreading over ``features``: start at the row nearest the mean, then
    repeatedly add the row farthest from those chosen (columns standardised first).

    >>> farthest_points(np.array([[0.0], [0.1], [5.0], [10.0]]), 3)
    [2, 0, 3]
    """
    f = np.asarray(features, np.float64)
    std = f.std(axis=0)
    f = (f - f.mean(axis=0)) / np.where(std > 0, std, 1.0)
    chosen = [int(np.argmin(np.linalg.norm(f, axis=1)))]
    distance = np.linalg.norm(f - f[chosen[0]], axis=1)
    while len(chosen) < min(n, len(f)):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(f - f[nxt], axis=1))
    return chosen


def _tile_origins(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last strip, overlapping its neighbour
    return starts


@dataclass(frozen=True)
class Int8SetResult:
    path: Path
    n_chosen: int
    n_candidates: int
    n_frames: int
    skipped: tuple[str, ...]


def int8_calibration_set(
    profile: str | Path,
    images_dir: Path,
    out: Path,
    *,
    n: int = 32,
    tile: int = 512,
    threads: int | None = None,
    progress: bool = False,
) -> Int8SetResult:
    """Pick ``n`` model-ready tiles spanning ``images_dir`` and save them for INT8 calibration.

    Every frame goes through the analyser's ``prepare`` (validation, resampling to the model's
    pixel size, median, normalisation), is cut into ``tile``² tiles (mirror-padded when smaller),
    and each tile is described by its mean, standard deviation and particle coverage (the
    model's own mask at its threshold). Farthest-point sampling over those three picks tiles
    from the extremes as well as the typical, which is what activation-range calibration needs.

    The ``.npz`` (no pickled objects; ``np.load(path, allow_pickle=False)`` reads it) holds
    ``images`` (n, 1, tile, tile) float32 — the ONNX input — plus ``names``, ``origins`` (row,
    col at model resolution), ``stats``/``stat_names``, and ``onnx``, ``onnx_sha256``,
    ``profile``, ``pixel_size_nm``, ``normalisation``, ``threshold`` to tie it to the model.
    """
    from tqdm import tqdm

    from latticewatch.errors import FrameError

    from latticewatch.runtime.analyser import Analyser
    from latticewatch.io.readers import SUPPORTED_SUFFIXES, ReadError, read_frames

    analyser = Analyser(profile, threads=threads)
    seg = analyser.manifest.segmentation
    divisor = seg.divisor
    if tile % divisor:
        raise ValueError(f"--tile must be a multiple of {divisor} for this network, got {tile}")
    files = sorted(p for p in Path(images_dir).iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{images_dir}: no micrographs ({', '.join(SUPPORTED_SUFFIXES)})")
    tiles, names, origins, skipped = [], [], [], []
    n_frames = 0
    for path in tqdm(files, desc="frames", unit="file", disable=not progress):
        try:
            frames = list(read_frames(path))
        except (ReadError, OSError) as err:
            skipped.append(f"{path}: {err}")
            continue
        for frame in frames:
            try:
                image = analyser.prepare(frame).pre.image
            except FrameError as err:
                skipped.append(str(err))
                continue
            n_frames += 1
            h, w = image.shape
            if h < tile or w < tile:
                image = np.pad(image, ((0, max(0, tile - h)), (0, max(0, tile - w))), mode="symmetric")
            for r in _tile_origins(image.shape[0], tile):
                for c in _tile_origins(image.shape[1], tile):
                    tiles.append(np.ascontiguousarray(image[r : r + tile, c : c + tile], np.float32))
                    names.append(frame.name)
                    origins.append((r, c))
    if not tiles:
        raise FileNotFoundError(f"{images_dir}: no frame could be prepared ({len(skipped)} skipped)")
    coverage = []
    for start in range(0, len(tiles), 8):
        batch = np.stack(tiles[start : start + 8])[:, None]
        coverage.extend((analyser.backend.predict(batch)[:, 0] >= seg.threshold).mean(axis=(1, 2)).tolist())
    stats = np.array([[t.mean(), t.std(), cov] for t, cov in zip(tiles, coverage)], np.float64)
    chosen = farthest_points(stats, n)
    if len(chosen) < n:
        log.warning("only %d tiles available, fewer than the %d asked for", len(chosen), n)
    m = analyser.manifest
    arrays = {
        "images": np.stack([tiles[i] for i in chosen])[:, None],
        "names": np.array([names[i] for i in chosen]),
        "origins": np.array([origins[i] for i in chosen], np.int64),
        "stats": stats[chosen],
        "stat_names": np.array(INT8_STATS),
        "onnx": np.array(seg.onnx),
        "onnx_sha256": np.array(m.files[seg.onnx]),
        "profile": np.array(f"{m.name}@{m.version}"),
        "pixel_size_nm": np.array(np.nan if seg.pixel_size_nm is None else seg.pixel_size_nm),
        "normalisation": np.array(seg.normalisation),
        "threshold": np.array(seg.threshold),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # np.savez appends .npz to names without it; write_atomic must get the final name
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    write_atomic(out, lambda fh: np.savez(fh, **arrays))
    return Int8SetResult(out, len(chosen), len(tiles), n_frames, tuple(skipped))
