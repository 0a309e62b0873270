from pathlib import Path

import numpy as np
import pytest

from latticewatch.calibration import CalibrationError, InstrumentCalibration, apply_calibration, load_calibration
from latticewatch.frame import Frame

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "calibration").glob("*.toml"))


def test_there_are_shipped_calibration_files():
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_calibration_file_validates(path):
    calibration = load_calibration(path)
    assert isinstance(calibration, InstrumentCalibration)
    # higher magnification, finer sampling
    steps = sorted(calibration.steps, key=lambda s: s.magnification)
    assert all(a.pixel_size_nm > b.pixel_size_nm for a, b in zip(steps, steps[1:]))


def test_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('instrument = "x"\ncamera = "y"\nsource = "z"\n'
                   '[[steps]]\nmagnification = -1\npixel_size_nm = 0.02\n')
    with pytest.raises(CalibrationError, match=r"bad.toml: steps.0.magnification: Input should be greater than 0"):
        load_calibration(bad)
    dup = tmp_path / "dup.toml"
    dup.write_text('instrument = "x"\ncamera = "y"\nsource = "z"\n'
                   '[[steps]]\nmagnification = 1e6\npixel_size_nm = 0.02\n'
                   '[[steps]]\nmagnification = 1.001e6\npixel_size_nm = 0.03\n')
    with pytest.raises(CalibrationError, match="same step"):
        load_calibration(dup)
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.toml")


def test_pixel_size_only_filled_in_when_the_data_has_none():
    calibration = load_calibration(SHIPPED[0])
    step = calibration.steps[0]
    pixels = np.zeros((32, 32), np.uint16)
    bare = Frame("a.tif", pixels, None, meta={"mdoc": {"Magnification": step.magnification}})
    filled = apply_calibration(bare, calibration, SHIPPED[0].name)
    assert filled.pixel_size_nm == step.pixel_size_nm and SHIPPED[0].name in filled.meta["pixel_size_source"]
    measured = Frame("b.mrc", pixels, 0.031, meta={"mdoc": {"Magnification": step.magnification}})
    assert apply_calibration(measured, calibration, "x").pixel_size_nm == 0.031
    unknown_mag = Frame("c.tif", pixels, None, meta={"magnification": 1234.0})
    assert apply_calibration(unknown_mag, calibration, "x").pixel_size_nm is None
