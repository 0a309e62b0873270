"""Berkeley EMD, DM3/DM4 and SER through ncempy (`latticewatch.io.readers.ncem`).

EMD files come from ncempy's own writer. Neither ncempy nor any installed package ships DM3/DM4/SER
samples or a writer for them, so `_dm_bytes` and `_ser_bytes` below write minimal files following the
published layouts (Gatan's DM3/DM4 tag tree as documented by Chris Boothroyd and by ncempy's
reader; FEI/Thermo TIA's SER series format), and every such fixture is first read back with
ncempy's own high-level reader (`dmReader`, `serReader`) to prove it is a file ncempy accepts.
"""

from __future__ import annotations

import struct
from datetime import datetime, timedelta, timezone

import h5py
import numpy as np
import pytest
from ncempy.io import dm as ncem_dm
from ncempy.io import emd as ncem_emd
from ncempy.io import ser as ncem_ser

from latticewatch.io.readers import count_sections, read_frames
from reader_files import json_ok, raises_read_error, random_image, read_one

# ============================================================================================
# Berkeley EMD (ncempy's writer)


def test_emd_single_image(tmp_path):
    data = random_image((48, 32), "float32")
    path = tmp_path / "image.emd"
    ncem_emd.emdWriter(path, data, pixel_size=(0.05, 0.05), pixel_unit=("nm", "nm"))
    frame = read_one(path)
    assert frame.frame_id == str(path)
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm == pytest.approx(0.05)
    assert frame.meta["format"] == "emd" and frame.meta["emd_group"] == "/data/converted"
    json_ok(frame.meta)


def test_emd_stack_with_emd_style_units(tmp_path):
    stack = random_image((3, 32, 32), "uint16")
    path = tmp_path / "stack.emd"
    ncem_emd.emdWriter(path, stack, pixel_size=(1, 2.0, 2.0), pixel_unit=("frame", "[A]", "[A]"))
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(3)]
    np.testing.assert_array_equal(frames[2].pixels, stack[2])
    assert frames[0].pixel_size_nm == pytest.approx(0.2)
    assert count_sections(path) == 3


def test_emd_default_units_are_unknown(tmp_path):
    path = tmp_path / "nounit.emd"
    ncem_emd.emdWriter(path, random_image((32, 32), "int16"))
    frame = read_one(path)
    assert frame.pixel_size_nm is None
    assert "not a length" in frame.meta["pixel_size_note"]


def test_emd_not_hdf5_and_hdf5_without_emd(tmp_path):
    path = tmp_path / "text.emd"
    path.write_text("not hdf5")
    raises_read_error(path, r"not an EMD file \(not HDF5\)")
    other = tmp_path / "other.emd"
    with h5py.File(other, "w") as h5:
        h5["Data/Image/abc/Data"] = np.zeros((4, 4))
    raises_read_error(other, "no Berkeley EMD data group")


# ============================================================================================
# DM3 / DM4: a minimal writer of Gatan's tag tree, checked against ncempy's dmReader

_DM_TAG_TYPES = {
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("uint16"): 4,
    np.dtype("uint32"): 5,
    np.dtype("float32"): 6,
    np.dtype("float64"): 7,
    np.dtype("bool"): 8,
    np.dtype("int8"): 9,
    np.dtype("uint8"): 10,
    np.dtype("uint64"): 12,
}
# ImageData.DataType codes for the pixel array
_DM_IMAGE_TYPES = {
    np.dtype("int16"): 1,
    np.dtype("float32"): 2,
    np.dtype("uint8"): 6,
    np.dtype("int32"): 7,
    np.dtype("int8"): 9,
    np.dtype("uint16"): 10,
    np.dtype("uint32"): 11,
    np.dtype("float64"): 12,
}


def _dm_bytes(version: int, root: dict) -> bytes:
    """Serialise a nested dict (groups), list (unlabelled groups) and value tree as DM3/DM4.

    Layout per the DM3/DM4 description: big-endian header (version, root length, byte order 1 =
    little-endian data), then the root tag group. A group is ``sorted(u1) open(u1) ntags``; an
    entry is ``type(u1: 20 group, 21 data) label_len(>u2) label`` (+ ``>u8`` size in DM4) and
    then either a group or ``'%%%%' ninfo info[ninfo] data``. DM3 uses 4-byte, DM4 8-byte counts.
    """
    fmt = ">I" if version == 3 else ">Q"

    def count(n: int) -> bytes:
        return struct.pack(fmt, n)

    def value(v) -> tuple[list[int], bytes]:
        if isinstance(v, str):
            chars = np.array([ord(c) for c in v], "<u2")
            return [20, 4, len(chars)], chars.tobytes()
        if isinstance(v, np.ndarray):
            return [20, _DM_TAG_TYPES[v.dtype], v.size], v.astype(v.dtype.newbyteorder("<")).tobytes()
        v = np.asarray(v)
        return [_DM_TAG_TYPES[v.dtype]], v.astype(v.dtype.newbyteorder("<")).tobytes()

    def group(entries) -> bytes:
        items = entries.items() if isinstance(entries, dict) else [("", e) for e in entries]
        out = bytes([0, 1]) + count(len(items))
        for label, v in items:
            raw = label.encode("latin-1")
            if isinstance(v, (dict, list)):
                kind, body = 20, group(v)
            else:
                info, data = value(v)
                kind, body = 21, b"%%%%" + count(len(info)) + b"".join(count(i) for i in info) + data
            out += bytes([kind]) + struct.pack(">H", len(raw)) + raw
            out += (struct.pack(">Q", len(body)) if version == 4 else b"") + body
        return out

    tree = group(root)
    head = struct.pack(">I", version) + count(len(tree) + (8 if version == 3 else 16)) + struct.pack(">I", 1)
    return head + tree + b"\0" * (8 if version == 3 else 16)


def _dm_calibration(scale: float, unit: str) -> dict:
    return {"Origin": np.float32(0), "Scale": np.float32(scale), "Units": unit}


def _dm_image(data: np.ndarray, scale: float, unit: str, tags: dict | None = None) -> dict:
    dims = data.shape[::-1]  # DM lists x first
    return {
        "ImageData": {
            "Calibrations": {
                "Brightness": {"Origin": np.float32(0), "Scale": np.float32(1), "Units": "counts"},
                "Dimension": [_dm_calibration(scale, unit) for _ in dims[:2]]
                + [_dm_calibration(1, "") for _ in dims[2:]],
            },
            "Data": np.ascontiguousarray(data).ravel(),
            "DataType": np.int32(_DM_IMAGE_TYPES[data.dtype]),
            "Dimensions": [np.uint32(d) for d in dims],
            "PixelDepth": np.uint32(data.dtype.itemsize),
        },
        "ImageTags": tags or {},
        "Name": "latticewatch test",
    }


def _thumbnail() -> dict:
    rgba = np.zeros((16, 16), np.uint32)
    return {
        "ImageData": {
            "Calibrations": {
                "Dimension": [_dm_calibration(1, ""), _dm_calibration(1, "")],
            },
            "Data": rgba.ravel(),
            "DataType": np.int32(23),  # RGBA
            "Dimensions": [np.uint32(16), np.uint32(16)],
            "PixelDepth": np.uint32(4),
        },
    }


def _filetime(when: datetime) -> float:
    return (when - datetime(1601, 1, 1, tzinfo=timezone.utc)) / timedelta(microseconds=1) * 10


@pytest.fixture
def dm4_file(tmp_path):
    data = random_image((32, 48), "float32")
    when = datetime(2022, 10, 11, 9, 30, 0, tzinfo=timezone.utc)
    tags = {
        "DataBar": {
            "Acquisition Date": "10/11/2022",
            "Acquisition Time": "9:30:00 AM",
            "Acquisition Time (OS)": np.float64(_filetime(when)),
        },
        "Microscope Info": {"Voltage": np.float64(300000.0), "Indicated Magnification": np.float64(500000.0)},
    }
    path = tmp_path / "particles.dm4"
    path.write_bytes(_dm_bytes(4, {"ImageList": [_thumbnail(), _dm_image(data, 0.0123, "nm", tags)]}))
    return path, data, when


def test_dm4_fixture_is_a_real_dm4_for_ncempy(dm4_file):
    path, data, _ = dm4_file
    out = ncem_dm.dmReader(path)
    np.testing.assert_array_equal(out["data"], data)
    assert out["pixelUnit"] == ["nm", "nm"]
    assert out["pixelSize"][1] == pytest.approx(0.0123)


def test_dm4_image_with_thumbnail(dm4_file):
    path, data, when = dm4_file
    frame = read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.float32
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm == pytest.approx(0.0123)
    assert frame.acquired_at == when  # from the FILETIME, UTC
    assert frame.meta["format"] == "dm4"
    assert frame.meta["dm_tags"]["Microscope Info Voltage"] == 300000.0
    json_ok(frame.meta)
    assert count_sections(path) == 1


def test_dm3_stack_in_micrometres_with_date_strings(tmp_path):
    stack = random_image((3, 32, 32), "uint16")
    tags = {"DataBar": {"Acquisition Date": "3/14/2019", "Acquisition Time": "2:05:32 PM"}}
    path = tmp_path / "series.dm3"
    path.write_bytes(_dm_bytes(3, {"ImageList": [_dm_image(stack, 0.002, "µm", tags)]}))
    np.testing.assert_array_equal(ncem_dm.dmReader(path)["data"], stack)  # ncempy agrees
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(3)]
    for frame, expected in zip(frames, stack):
        np.testing.assert_array_equal(frame.pixels, expected)
    assert frames[0].pixel_size_nm == pytest.approx(2.0)
    assert frames[0].acquired_at == datetime(2019, 3, 14, 14, 5, 32)  # local time, naive
    assert count_sections(path) == 3


def test_dm_uncalibrated_is_unknown(tmp_path):
    path = tmp_path / "raw.dm4"
    path.write_bytes(_dm_bytes(4, {"ImageList": [_dm_image(random_image((32, 32), "int16"), 1.0, "")]}))
    frame = read_one(path)
    assert frame.pixel_size_nm is None and frame.acquired_at is None


def test_dm_text_and_truncated(tmp_path, dm4_file):
    path = tmp_path / "notes.dm4"
    path.write_text("not a DM file, just text\n")
    raises_read_error(path, "cannot read as DM3/DM4: File is not a valid DM3 or DM4")
    good, _, _ = dm4_file
    cut = tmp_path / "cut.dm4"
    cut.write_bytes(good.read_bytes()[:2000])
    raises_read_error(cut, "cannot read as DM3/DM4")


def test_dm_spectrum_only_is_refused(tmp_path):
    spectrum = {
        "ImageData": {
            "Calibrations": {"Dimension": [_dm_calibration(0.1, "eV")]},
            "Data": np.zeros(64, np.float32),
            "DataType": np.int32(2),
            "Dimensions": [np.uint32(64)],
            "PixelDepth": np.uint32(4),
        }
    }
    path = tmp_path / "eels.dm4"
    path.write_bytes(_dm_bytes(4, {"ImageList": [spectrum]}))
    raises_read_error(path, "no 2-D image in the DM file")


# ============================================================================================
# SER: a minimal TIA series writer, checked against ncempy's serReader

_SER_TYPES = {  # TIA's data type codes
    np.dtype(t): code
    for t, code in [("uint8", 1), ("uint16", 2), ("int16", 5), ("int32", 6), ("float32", 7), ("float64", 8)]
}


def _ser_bytes(
    images: np.ndarray, pixel_m: float, times: list[int] | None = None, data_type_id: int = 0x4122
) -> bytes:
    """TIA SER v0x0220: header, one dimension (the series), data elements, time tags, offset table.

    A 2-D element is ``(offset, delta, element)`` calibrations for x and y, the data type, the
    array size (x, y) and the rows bottom-up.
    """
    n = len(images)
    times = times or [0] * n
    desc, units = b"Number", b""
    head_len = 6 + 16 + 8 + 4 + (4 + 16 + 8 + len(desc) + 4 + len(units))
    elements = []
    for img in images:
        rows, cols = img.shape
        elements.append(
            struct.pack("<ddi", 0.0, pixel_m, 0)
            + struct.pack("<ddi", 0.0, pixel_m, 0)
            + struct.pack("<h", _SER_TYPES[img.dtype])
            + struct.pack("<ii", cols, rows)
            + np.flipud(img).astype(img.dtype.newbyteorder("<")).tobytes()
        )
    tags = [struct.pack("<ii", 0x4152, t) for t in times]
    table_at = head_len  # TIA puts the offset table right after the header
    data_offsets, pos = [], head_len + 16 * n
    for e in elements:
        data_offsets.append(pos)
        pos += len(e)
    tag_offsets = []
    for t in tags:
        tag_offsets.append(pos)
        pos += len(t)
    header = (
        struct.pack("<hhh", 0x4949, 0x0197, 0x0220)
        + struct.pack("<iiii", data_type_id, 0x4152, n, n)
        + struct.pack("<q", table_at)
        + struct.pack("<i", 1)
        + struct.pack("<idd", n, 0.0, 1.0)
        + struct.pack("<ii", 0, len(desc))
        + desc
        + struct.pack("<i", len(units))
        + units
    )
    assert len(header) == head_len
    table = struct.pack(f"<{n}q", *data_offsets) + struct.pack(f"<{n}q", *tag_offsets)
    return header + table + b"".join(elements) + b"".join(tags)


def test_ser_series_fixture_is_a_real_ser_for_ncempy_and_reads(tmp_path):
    images = random_image((2, 32, 40), "float32")
    t0 = int(datetime(2021, 5, 6, 7, 8, 9, tzinfo=timezone.utc).timestamp())
    path = tmp_path / "series_1.ser"
    path.write_bytes(_ser_bytes(images, 1.5e-10, times=[t0, t0 + 2]))
    out = ncem_ser.serReader(path)
    np.testing.assert_array_equal(out["data"], images)
    assert out["pixelSize"][0] == pytest.approx(1.5e-10)

    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#0", f"{path}#1"]
    for frame, expected in zip(frames, images):
        np.testing.assert_array_equal(frame.pixels, expected)
        assert frame.pixel_size_nm == pytest.approx(0.15)
    assert frames[1].acquired_at == datetime(2021, 5, 6, 7, 8, 11, tzinfo=timezone.utc)
    assert frames[0].meta["format"] == "ser"
    json_ok(frames[0].meta)
    assert count_sections(path) == 2


def test_ser_single_image_with_emi_date(tmp_path):
    image = random_image((1, 32, 32), "int16")
    path = tmp_path / "image_1.ser"
    path.write_bytes(_ser_bytes(image, 2e-11))
    (tmp_path / "image.emi").write_bytes(
        b"\x00binary preamble\x00<ObjectInfo><Uuid>x</Uuid>"
        b"<AcquireDate>Thu Mar 14 14:05:32 2019</AcquireDate>"
        b"<Manufacturer>FEI</Manufacturer><DetectorPixelHeight>1</DetectorPixelHeight>"
        b"<DetectorPixelWidth>1</DetectorPixelWidth><ExperimentalConditions><MicroscopeConditions>"
        b"<AcceleratingVoltage>300000</AcceleratingVoltage></MicroscopeConditions></ExperimentalConditions>"
        b"<ExperimentalDescription><Root><Data><Label>Magnification</Label>"
        b"<Value>630000</Value><Unit>x</Unit>"
        b"</Data></Root></ExperimentalDescription><AcquireInfo><FrameTime>1</FrameTime></AcquireInfo>"
        b"<DetectorRange><StartX>0</StartX></DetectorRange></ObjectInfo>\x00"
    )
    frame = read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.int16
    np.testing.assert_array_equal(frame.pixels, image[0])
    assert frame.pixel_size_nm == pytest.approx(0.02)
    assert frame.acquired_at == datetime(2019, 3, 14, 14, 5, 32)
    assert frame.meta["ser_header"]["AcceleratingVoltage"] == 300000
    json_ok(frame.meta)


def test_ser_spectra_text_truncated_and_tiny(tmp_path):
    spectra = tmp_path / "eels_1.ser"
    spectra.write_bytes(_ser_bytes(random_image((1, 32, 32), "float32"), 1e-10, data_type_id=0x4120))
    raises_read_error(spectra, "SER file holds 1-D spectra, not images")

    text = tmp_path / "text_1.ser"
    text.write_text("hello, not TIA\n")
    raises_read_error(text, "cannot read as SER")

    cut = tmp_path / "cut_1.ser"
    raw = _ser_bytes(random_image((1, 64, 64), "float32"), 1e-10)
    cut.write_bytes(raw[: len(raw) // 2])  # header and offset table intact, pixels short
    raises_read_error(cut, "truncated or corrupt SER element 0")

    tiny = tmp_path / "tiny_1.ser"
    tiny.write_bytes(_ser_bytes(random_image((1, 4, 4), "float32"), 1e-10))
    raises_read_error(tiny, "only 4×4 pixels")


def test_ser_uint8_despite_ncempy_dtype_typo(tmp_path):
    image = random_image((1, 32, 32), "uint8")
    path = tmp_path / "bytes_1.ser"
    path.write_bytes(_ser_bytes(image, 1e-10))
    frame = read_one(path)
    assert frame.pixels.dtype == np.uint8
    np.testing.assert_array_equal(frame.pixels, image[0])


def test_ser_diffraction_calibration_is_implausible(tmp_path):
    path = tmp_path / "diff_1.ser"
    path.write_bytes(_ser_bytes(random_image((1, 32, 32), "float32"), 3.0e7))  # 1/m, reciprocal space
    frame = read_one(path)
    assert frame.pixel_size_nm is None
    assert "implausible" in frame.meta["pixel_size_note"]
