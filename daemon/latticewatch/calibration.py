"""Instrument calibration files: camera + magnification → pixel size, for data without one.

Pixel size comes from the data first (MRC header, .mdoc, stream header); only when the data has
none is it looked up here by the frame's magnification. Files live in ``calibration/`` as TOML::

    instrument = "TEAM I"
    camera = "OneView"
    source = "how and when it was measured"
    [[steps]]
    magnification = 620000
    pixel_size_nm = 0.0243
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from latticewatch.errors import ConfigError
from latticewatch.frame import Frame

#: Magnifications closer than this (relative) are the same step: headers round differently.
MAGNIFICATION_TOLERANCE = 0.005


class CalibrationError(ConfigError):
    """A calibration file that cannot be used; the message names the file and the key."""


class MagnificationStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    magnification: float = Field(gt=0, description="nominal magnification as the microscope reports it")
    pixel_size_nm: float = Field(gt=0, lt=100, description="measured sampling at this magnification")
    source: str | None = Field(None, description="how this step was measured, when it differs from the file's source")


class InstrumentCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instrument: str
    camera: str
    source: str = Field(description="how the calibration was measured (standard, date, who)")
    voltage_kv: float | None = Field(None, gt=0)
    binning: int = Field(1, ge=1)
    steps: tuple[MagnificationStep, ...] = Field(min_length=1)

    @field_validator("steps")
    @classmethod
    def _distinct(cls, steps: tuple[MagnificationStep, ...]) -> tuple[MagnificationStep, ...]:
        mags = sorted(s.magnification for s in steps)
        for a, b in zip(mags, mags[1:]):
            if b / a - 1 < MAGNIFICATION_TOLERANCE:
                raise ValueError(f"magnifications {a:g} and {b:g} are the same step; keep one")
        return steps

    def pixel_size_nm(self, magnification: float) -> float | None:
        """The calibrated pixel size at ``magnification``, or ``None`` if it was not calibrated.

        Examples
        --------
        >>> cal = InstrumentCalibration(instrument="X", camera="Y", source="test",
        ...                             steps=[{"magnification": 1e6, "pixel_size_nm": 0.02}])
        >>> cal.pixel_size_nm(1.002e6), cal.pixel_size_nm(5e5)
        (0.02, None)
        """
        for step in self.steps:
            if abs(magnification / step.magnification - 1) < MAGNIFICATION_TOLERANCE:
                return step.pixel_size_nm
        return None


def load_calibration(path: str | Path) -> InstrumentCalibration:
    """Read and validate one calibration TOML file."""
    path = Path(path)
    try:
        return InstrumentCalibration.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise CalibrationError(f"{path}: not valid TOML: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise CalibrationError(f"{path}: {problems}") from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    # a JSON string is a valid TOML basic string (same escapes)
    return json.dumps(str(value), ensure_ascii=False)


def calibration_toml(calibration: InstrumentCalibration, comments: list[str] | tuple[str, ...] = ()) -> str:
    """The TOML text of a calibration, steps sorted by magnification, ``comments`` on top.

    Examples
    --------
    >>> cal = InstrumentCalibration(instrument="X", camera="Y", source="test",
    ...                             steps=[{"magnification": 1e6, "pixel_size_nm": 0.02}])
    >>> InstrumentCalibration.model_validate(tomllib.loads(calibration_toml(cal))) == cal
    True
    """
    lines = [c if c.startswith("#") else f"# {c}" for c in comments]
    data = calibration.model_dump(exclude_none=True)
    steps = sorted(data.pop("steps"), key=lambda s: s["magnification"])
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items()]
    for step in steps:
        lines += ["", "[[steps]]"] + [f"{key} = {_toml_value(value)}" for key, value in step.items()]
    return "\n".join(lines) + "\n"


def frame_magnification(frame: Frame) -> float | None:
    """The magnification recorded with a frame (SerialEM .mdoc, or a reader's header field)."""
    for source in (frame.meta.get("mdoc", {}), frame.meta):
        value = source.get("Magnification", source.get("magnification"))
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def apply_calibration(frame: Frame, calibration: InstrumentCalibration, name: str) -> Frame:
    """``frame`` with its pixel size from ``calibration`` when the data itself has none."""
    if frame.pixel_size_nm is not None:
        return frame
    magnification = frame_magnification(frame)
    pixel_size = calibration.pixel_size_nm(magnification) if magnification else None
    if pixel_size is None:
        return frame
    meta = {**frame.meta, "pixel_size_source": f"calibration {name} at {magnification:g}×"}
    return dataclasses.replace(frame, pixel_size_nm=pixel_size, meta=meta)
