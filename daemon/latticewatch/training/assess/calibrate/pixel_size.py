"""``latticewatch calibrate pixel-size``: the camera's pixel size at a magnification, from the
lattice fringes of a known crystal (e.g. Au (111), 0.2355 nm), added to an instrument calibration
TOML (:mod:`latticewatch.calibration`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from latticewatch.calibration import (
    MAGNIFICATION_TOLERANCE,
    CalibrationError,
    InstrumentCalibration,
    MagnificationStep,
    calibration_toml,
    load_calibration,
)
from latticewatch.io.atomic import write_atomic
from latticewatch.training.assess.calibrate.crystals import CRYSTALS, d_spacing
from latticewatch.training.assess.calibrate.fringes import FringeMeasurement, measure_fringe_frequency

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PixelSizeResult:
    pixel_size_nm: float
    d_nm: float
    measurement: FringeMeasurement
    header_pixel_size_nm: float | None
    calibration: InstrumentCalibration
    replaced: float | None  # pixel size previously stored at this magnification
    warnings: tuple[str, ...]


def _spacing(material: str, reflection: str | None, lattice_nm: float | None) -> float:
    """The fringe spacing (nm): ``lattice_nm`` as given (checked against the table), else the table's."""
    if lattice_nm is None:
        if not reflection:
            raise CalibrationError("give --reflection (e.g. 111) or the spacing itself with --lattice-nm")
        return d_spacing(material, reflection)
    if lattice_nm <= 0:
        raise CalibrationError(f"--lattice-nm must be positive, got {lattice_nm}")
    d = float(lattice_nm)
    if reflection and material.lower() in {k.lower() for k in CRYSTALS}:
        table = d_spacing(material, reflection)
        if abs(table / d - 1) > 0.02:
            log.warning("--lattice-nm %.4f differs from the table's %s (%s) %.4f nm", d, material, reflection, table)
    return d


def _measurement_warnings(measurement: FringeMeasurement) -> list[str]:
    warnings = []
    if measurement.period_px < 3:
        warnings.append(f"fringe period {measurement.period_px:.2f} px is close to Nyquist: use a higher "
                        "magnification or a larger spacing")
    if measurement.method == "spots" and measurement.spread > 0.01:
        warnings.append(f"reflections disagree by {100 * measurement.spread:.1f} %: distorted image, mixed "
                        "reflections, or astigmatism")
    return warnings


def _with_step(out: Path, step: MagnificationStep, *, camera: str, voltage_kv: float | None, binning: int,
               instrument: str | None) -> tuple[dict[str, Any], list[str], float | None]:
    """The calibration file's data with ``step`` added (replacing one at the same magnification),
    its leading comment lines, and the pixel size replaced."""
    today = date.today().isoformat()
    if not out.exists():
        if not instrument:
            raise CalibrationError(f"{out} does not exist yet: give --instrument to create it")
        data = {"instrument": instrument, "camera": camera, "voltage_kv": voltage_kv, "binning": binning,
                "source": "lattice fringes of known crystals, measured with latticewatch calibrate pixel-size; "
                          "see each step",
                "steps": [step.model_dump()]}
        return data, [f"# Instrument calibration written by latticewatch calibrate pixel-size ({today})."], None
    existing = load_calibration(out)
    conditions = (("camera", existing.camera, camera), ("voltage_kv", existing.voltage_kv, voltage_kv),
                  ("binning", existing.binning, binning))
    problems = [f"{name} {old!r} ≠ {new!r}" for name, old, new in conditions
                if new is not None and old is not None and old != new]
    if problems:
        raise CalibrationError(f"{out}: calibrated for other conditions ({'; '.join(problems)}); write a separate file")
    replaced, kept = None, []
    for s in existing.steps:
        if abs(step.magnification / s.magnification - 1) < MAGNIFICATION_TOLERANCE:
            replaced = s.pixel_size_nm
        else:
            kept.append(s)
    data = existing.model_dump()
    data["steps"] = [s.model_dump() for s in kept] + [step.model_dump()]
    if instrument and instrument != existing.instrument:
        raise CalibrationError(f"{out}: is for instrument {existing.instrument!r}, not {instrument!r}")
    comments = []
    for line in out.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        comments.append(line)
    return data, comments, replaced


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

    d = _spacing(material, reflection, lattice_nm)
    frame = next(iter(read_frames(image_path)))
    frange = (0.02, 0.5)
    if near_nm_per_px:
        expected = near_nm_per_px / d  # cycles/pixel
        frange = (expected / 1.25, min(0.5, expected * 1.25))
    measurement = measure_fringe_frequency(frame.pixels, frequency_range=frange)
    pixel_size = d * measurement.frequency
    warnings = _measurement_warnings(measurement)
    step = MagnificationStep(
        magnification=magnification, pixel_size_nm=round(pixel_size, 6),
        source=f"{material} ({reflection or '?'}) fringes, d = {d:.5f} nm, {measurement.method}, "
               f"period {measurement.period_px:.3f} px; {image_path.name}; "
               f"latticewatch calibrate pixel-size {date.today().isoformat()}",
    )
    data, comments, replaced = _with_step(out, step, camera=camera, voltage_kv=voltage_kv, binning=binning,
                                          instrument=instrument)
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
    """An instrument calibration from TOML text (``path`` only names it in errors).

    >>> load_calibration_text('instrument = "TEAM I"', Path("team1.toml"))  # doctest: +SKIP
    """
    import tomllib

    try:
        return InstrumentCalibration.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise CalibrationError(f"{path}: {err}") from None
