"""mdoc parsing: SerialEM's keys, both date formats, a file cut off mid-write."""

import pytest

from latticewatch.io.mdoc import parse_mdoc, section_info

MDOC = """PixelSpacing = 1.35
Voltage = 300
ImageFile = grid1.mrc
ImageSize = 4096 4096
DataMode = 6

[T = SerialEM: Digitized on Krios-2                  04-Dec-19  10:38:01    ]

[ZValue = 0]
TiltAngle = 0.00199997
StagePosition = -4.20013 7.80912
StageZ = -42.3
Magnification = 490000
ExposureDose = 31.6
PixelSpacing = 0.215
Defocus = -0.0512
DateTime = 04-Dec-19  10:38:23
TimeStamp = 344778503
NavigatorLabel = 12-3

[ZValue = 1]
TiltAngle = 3.0
DateTime = 04-Dec-2019  10:38:41
"""


def test_section_keys_in_physical_units():
    doc = parse_mdoc(MDOC)
    info = section_info(doc, 0)
    assert info.pixel_size_nm == pytest.approx(0.0215)
    m = info.meta
    assert m["Magnification"] == 490000 and m["Defocus"] == pytest.approx(-0.0512) and m["ExposureDose"] == 31.6
    assert m["StagePosition"] == [pytest.approx(-4.20013), pytest.approx(7.80912)]
    assert m["TimeStamp"] == 344778503 and m["NavigatorLabel"] == "12-3" and m["raw"]["StageZ"] == "-42.3"
    assert info.acquired_at.isoformat() == "2019-12-04T10:38:23"


def test_four_digit_year_and_global_fallback():
    info = section_info(parse_mdoc(MDOC), 1)
    assert info.acquired_at.isoformat() == "2019-12-04T10:38:41"
    assert info.pixel_size_nm == pytest.approx(0.135)  # only the global PixelSpacing


def test_cut_off_text_is_parsed_and_flagged():
    doc = parse_mdoc(MDOC[: MDOC.index("TiltAngle = 3") + 8])
    assert doc.last_z == 1 and not doc.complete_last_line
    assert parse_mdoc(MDOC).complete_last_line
