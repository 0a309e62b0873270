"""Tests for latticewatch.io.readers on real files written by the format libraries.

MRC files come from mrcfile, TIFF from tifffile and Pillow, PNG from Pillow, Berkeley EMD from
ncempy's own writer. Neither ncempy nor any installed package ships DM3/DM4/SER samples or a
writer for them, so `_dm_bytes` and `_ser_bytes` below write minimal files following the
published layouts (Gatan's DM3/DM4 tag tree as documented by Chris Boothroyd and by ncempy's
reader; FEI/Thermo TIA's SER series format), and every such fixture is first read back with
ncempy's own high-level reader (`dmReader`, `serReader`) to prove it is a file ncempy accepts.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
from ncempy.io import dm as ncem_dm
from ncempy.io import emd as ncem_emd
from ncempy.io import ser as ncem_ser
from PIL import Image

from latticewatch.frame import MIN_SIDE_PX
from latticewatch.io.readers import SUPPORTED_SUFFIXES, ReadError, count_sections, read_frames

#: The readers' parent logger; each module logs on a child of it.
LOGGER = "latticewatch.io.readers"
RNG = np.random.default_rng(1234)


def _image(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return RNG.normal(100, 10, size=shape).astype(dt)
    info = np.iinfo(dt)
    return RNG.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dt)


def _read_one(path, **kwargs):
    frames = list(read_frames(path, **kwargs))
    assert len(frames) == 1
    return frames[0]


def _json_ok(meta: dict) -> None:
    json.dumps(meta, allow_nan=False)


def _raises(path, match: str, **kwargs) -> ReadError:
    """Reading `path` raises a ReadError that names the file and matches `match`."""
    with pytest.raises(ReadError, match=match) as info:
        list(read_frames(path, **kwargs))
    err = info.value
    assert str(path) in str(err)
    assert err.path == str(path)
    return err


# ============================================================================================
# MRC


def _write_mrc(path: Path, data: np.ndarray, voxel_size=None) -> Path:
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as mrc:
        warnings.filterwarnings("ignore", "Data array contains", RuntimeWarning)  # NaN fixtures
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size
    return path


def _patch_mrc_header(path: Path, **fields) -> None:
    """Edit header fields in place through mrcfile (as a broken writer would have left them)."""
    original = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # permissive mrcfile warns about the very fields we break
        with mrcfile.open(path, mode="r+", header_only=True, permissive=True) as mrc:
            for name, value in fields.items():
                mrc.header[name] = value
    # a header-only rewrite truncates the file after the header: put the data block back
    path.write_bytes(path.read_bytes()[:1024] + original[1024:])


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [(0, "int8"), (1, "int16"), (2, "float32"), (6, "uint16"), (12, "float16")],
)
def test_mrc_every_supported_mode_keeps_dtype_and_values(tmp_path, mode, dtype):
    data = _image((32, 48), dtype)
    path = _write_mrc(tmp_path / f"mode{mode}.mrc", data, voxel_size=1.25)
    frame = _read_one(path)
    assert frame.frame_id == str(path)  # single image: no section suffix
    assert frame.origin == str(path)
    assert frame.pixels.dtype == np.dtype(dtype)
    assert frame.pixels.dtype.isnative
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm == pytest.approx(0.125)
    assert frame.acquired_at is None
    assert frame.meta["mode"] == mode
    assert (frame.meta["nx"], frame.meta["ny"], frame.meta["nz"]) == (48, 32, 1)
    assert frame.meta["voxel_size_angstrom"][0] == pytest.approx(1.25)
    assert frame.meta["pixel_size_source"] == "mrc voxel_size"
    assert frame.meta["warnings"] == []
    _json_ok(frame.meta)
    assert count_sections(path) == 1


def test_mrc_stack_gives_one_frame_per_section(tmp_path):
    data = _image((4, 32, 40), "float32")
    path = _write_mrc(tmp_path / "stack.mrcs", data, voxel_size=2.0)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.set_image_stack()
        mrc.add_label("SerialEM: test stack")
        mrc.header.exttyp = b"SERI"
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(4)]
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.pixels, data[i])
        assert frame.pixels.flags.owndata and frame.pixels.flags.c_contiguous
        assert not isinstance(frame.pixels, np.memmap)
        assert frame.pixel_size_nm == pytest.approx(0.2)
        assert frame.meta["section"] == i and frame.meta["n_sections"] == 4
    assert "SerialEM: test stack" in frames[0].meta["labels"]
    assert frames[0].meta["exttyp"] == "SERI"
    assert frames[0].meta["ispg"] == 0
    assert count_sections(path) == 4
    # resume after a given section
    assert [f.frame_id for f in read_frames(path, start=2)] == [f"{path}#2", f"{path}#3"]


def test_mrc_stack_is_read_lazily_section_by_section(tmp_path):
    path = _write_mrc(tmp_path / "lazy.mrc", _image((3, 32, 32), "int16"))
    frames = read_frames(path)
    first = next(frames)
    assert first.frame_id.endswith("#0")
    frames.close()  # abandoning the iterator closes the file


def test_mrc_volume_sections_are_frames_too(tmp_path):
    path = _write_mrc(tmp_path / "tomo.rec", _image((2, 32, 32), "float32"))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.set_volume()
    assert [f.frame_id for f in read_frames(path)] == [f"{path}#0", f"{path}#1"]


def test_mrc_voxel_size_unset_is_none(tmp_path):
    path = _write_mrc(tmp_path / "unset.mrc", _image((32, 32), "float32"))  # mrcfile default: 0
    frame = _read_one(path)
    assert frame.pixel_size_nm is None
    assert "unset" in frame.meta["pixel_size_note"]


def test_mrc_imod_default_voxel_size_one_is_none(tmp_path, caplog):
    path = _write_mrc(tmp_path / "imod.mrc", _image((32, 32), "float32"), voxel_size=1.0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        frame = _read_one(path)
    assert frame.pixel_size_nm is None
    assert "IMOD" in frame.meta["pixel_size_note"]
    assert "IMOD" in caplog.text


def test_mrc_non_square_voxels_strict_and_permissive(tmp_path):
    path = _write_mrc(tmp_path / "aniso.mrc", _image((32, 32), "float32"), voxel_size=(2.0, 3.0, 1.0))
    _raises(path, "non-square pixels")
    frame = _read_one(path, permissive=True)
    assert frame.pixel_size_nm == pytest.approx(0.2)
    assert any("non-square" in w for w in frame.meta["warnings"])


@pytest.mark.parametrize(
    ("mode", "name"), [(3, "complex int16"), (4, "complex float32"), (101, "4-bit packed"), (7, "unknown")]
)
def test_mrc_unsupported_mode(tmp_path, mode, name):
    path = tmp_path / f"bad{mode}.mrc"
    if mode == 4:  # mrcfile writes mode 4 from complex64 data: a genuine file
        _write_mrc(path, np.ones((32, 32), np.complex64))
    else:
        _write_mrc(path, _image((32, 32), "int16"))
        _patch_mrc_header(path, mode=mode)
    for permissive in (False, True):
        expected = rf"unsupported MRC mode {mode} \({name}\); supported: 0, 1, 2, 6, 12"
        err = _raises(path, expected, permissive=permissive)
        assert err.section is None
    with pytest.raises(ReadError, match="unsupported MRC mode"):
        count_sections(path)


def test_mrc_truncated_stack_strict_refuses_permissive_reads_complete_sections(tmp_path, caplog):
    data = _image((3, 32, 32), "float32")
    path = _write_mrc(tmp_path / "cut.mrc", data)
    # cut in the middle of section 2, as a copy interrupted mid-way would
    os.truncate(path, 1024 + 2 * 32 * 32 * 4 + 100)
    err = _raises(path, r"truncated: the header declares 3 section\(s\) of 32×32 float32")
    assert "(13312 bytes) but the file has 9316 bytes" in err.problem
    with pytest.raises(ReadError, match="truncated"):
        count_sections(path)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        frames = list(read_frames(path, permissive=True))
    assert [f.frame_id for f in frames] == [f"{path}#0", f"{path}#1"]  # ids keep the stack form
    np.testing.assert_array_equal(frames[1].pixels, data[1])
    assert any("2 complete section" in w for w in frames[0].meta["warnings"])
    assert any(r.name.startswith(LOGGER + ".") and "truncated" in r.getMessage() for r in caplog.records)
    assert count_sections(path, permissive=True) == 2


def test_mrc_truncated_single_image_fails_even_permissive(tmp_path):
    path = _write_mrc(tmp_path / "cut1.mrc", _image((32, 32), "int16"))
    os.truncate(path, 1024 + 10)
    _raises(path, "truncated")
    _raises(path, "not one section is complete", permissive=True)


def test_mrc_header_only_fragment(tmp_path):
    path = _write_mrc(tmp_path / "frag.mrc", _image((32, 32), "int16"))
    os.truncate(path, 500)
    _raises(path, "not a valid MRC file.*enough bytes for MRC header")


def test_mrc_file_longer_than_declared_warns(tmp_path):
    path = _write_mrc(tmp_path / "long.mrc", _image((32, 32), "int16"))
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)
    frame = _read_one(path)
    assert any("64 bytes longer" in w for w in frame.meta["warnings"])


def test_mrc_not_an_mrc_file(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("these are my notes, not a map\n" * 60)
    _raises(path, "not a valid MRC file: Map ID string not found")


def test_mrc_bad_map_id_permissive_guesses(tmp_path):
    data = _image((32, 32), "int16")
    path = _write_mrc(tmp_path / "badmap.mrc", data)
    _patch_mrc_header(path, map=b"XXXX")
    _raises(path, "Map ID string not found")
    frame = _read_one(path, permissive=True)
    np.testing.assert_array_equal(frame.pixels, data)
    assert any("Map ID" in w for w in frame.meta["warnings"])


def test_mrc_absurd_declared_size_is_refused_before_reading(tmp_path):
    path = _write_mrc(tmp_path / "huge.mrc", _image((32, 32), "int8"))
    _patch_mrc_header(path, nx=40000, ny=40000, mx=40000, my=40000)
    # the file holds 1 KiB of data: had it been read first, this would be a truncation error
    err = _raises(path, r"declared size 40000×40000 = 1600000000 pixels exceeds max_pixels")
    assert "truncated" not in str(err)
    with pytest.raises(ReadError, match="exceeds max_pixels"):
        count_sections(path, permissive=True)


def test_mrc_max_pixels_is_configurable(tmp_path):
    path = _write_mrc(tmp_path / "small.mrc", _image((64, 64), "int16"))
    _raises(path, "exceeds max_pixels=1000", max_pixels=1000)


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (16, 4)])
def test_tiny_frames_are_refused(tmp_path, shape):
    path = _write_mrc(tmp_path / "tiny.mrc", _image(shape, "int16"))
    for permissive in (False, True):
        expected = rf"only {shape[1]}×{shape[0]} pixels; the minimum is {MIN_SIDE_PX}×{MIN_SIDE_PX}"
        _raises(path, expected, permissive=permissive)


def test_mrc_invalid_dimensions(tmp_path):
    path = _write_mrc(tmp_path / "zero.mrc", _image((32, 32), "int16"))
    _patch_mrc_header(path, nz=0)
    _raises(path, "invalid dimensions in header: nx=32, ny=32, nz=0")


def test_nan_and_inf_strict_names_the_count(tmp_path):
    data = _image((32, 32), "float32")
    data[0, :2] = np.nan
    data[5, 5] = np.inf
    path = _write_mrc(tmp_path / "nan.mrc", data)
    err = _raises(path, r"3 non-finite pixel\(s\) \(2 NaN, 1 ±Inf\) of 1024")
    assert err.section is None


def test_nan_permissive_replaces_by_median(tmp_path, caplog):
    data = _image((32, 32), "float32")
    data[3, 3] = np.nan
    data[4, 4] = -np.inf
    finite = data[np.isfinite(data)]
    median = float(np.median(finite))
    path = _write_mrc(tmp_path / "nanp.mrc", data)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        frame = _read_one(path, permissive=True)
    assert np.isfinite(frame.pixels).all()
    assert frame.pixels.dtype == np.float32
    assert frame.pixels[3, 3] == pytest.approx(median) and frame.pixels[4, 4] == pytest.approx(median)
    assert frame.meta["nonfinite_pixels"] == 2
    assert any("replaced by the median" in w for w in frame.meta["warnings"])
    assert any(r.name.startswith(LOGGER + ".") and "non-finite" in r.getMessage() for r in caplog.records)
    _json_ok(frame.meta)


def test_all_nan_is_refused_even_permissive(tmp_path):
    path = _write_mrc(tmp_path / "allnan.mrc", np.full((32, 32), np.nan, np.float32))
    _raises(path, "no finite pixel left", permissive=True)


def test_bad_section_in_stack_names_the_section_and_reading_can_resume(tmp_path):
    data = _image((3, 32, 32), "float32")
    data[1, 0, 0] = np.nan
    path = _write_mrc(tmp_path / "badsec.mrc", data)
    frames = read_frames(path)
    assert next(frames).frame_id == f"{path}#0"
    with pytest.raises(ReadError) as info:
        next(frames)
    err = info.value
    assert err.section == 1
    assert str(err).startswith(f"{path}#1: 1 non-finite pixel")
    rest = list(read_frames(path, start=err.section + 1))
    assert [f.frame_id for f in rest] == [f"{path}#2"]


# ============================================================================================
# TIFF


def test_tiff_plain_single_page(tmp_path):
    data = _image((40, 56), "uint16")
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, datetime=datetime(2024, 3, 14, 14, 5, 32), software="SerialEM")
    frame = _read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm is None
    assert frame.acquired_at == datetime(2024, 3, 14, 14, 5, 32)
    tags = frame.meta["tiff_tags"]
    assert tags["Compression"] == "NONE" and tags["Software"] == "SerialEM"
    assert tags["ImageWidth"] == 56 and tags["ImageLength"] == 40
    _json_ok(frame.meta)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64", "uint32"])
def test_tiff_dtypes(tmp_path, dtype):
    data = _image((32, 32), dtype)
    path = tmp_path / f"{dtype}.tiff"
    tifffile.imwrite(path, data, photometric="minisblack")
    frame = _read_one(path)
    assert frame.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(frame.pixels, data)


@pytest.mark.parametrize("compression", ["zlib", "adobe_deflate"])
def test_tiff_zip_deflate_compressed(tmp_path, compression):
    data = _image((48, 64), "uint16")
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, data, compression=compression)
    frame = _read_one(path)
    assert frame.meta["tiff_tags"]["Compression"] in ("ADOBE_DEFLATE", "DEFLATE")
    np.testing.assert_array_equal(frame.pixels, data)


@pytest.mark.parametrize(
    ("dtype", "compression"), [("uint16", "tiff_lzw"), ("float32", "tiff_lzw"), ("uint8", "tiff_adobe_deflate")]
)
def test_tiff_lzw_and_deflate_written_by_libtiff(tmp_path, dtype, compression):
    # Pillow (libtiff) writes LZW without extra packages; tifffile decodes LZW only with
    # imagecodecs, and the reader falls back to Pillow when that is missing
    stack = _image((3, 32, 40), dtype)
    path = tmp_path / f"{compression}_{dtype}.tif"
    pages = [Image.fromarray(p) for p in stack]
    pages[0].save(path, save_all=True, append_images=pages[1:], compression=compression)
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(3)]
    for frame, expected in zip(frames, stack):
        assert frame.pixels.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.pixels, expected)
    assert frames[0].meta["tiff_tags"]["Compression"] in ("LZW", "ADOBE_DEFLATE")
    assert count_sections(path) == 3


def test_tiff_multipage_separate_pages(tmp_path):
    stack = _image((3, 32, 32), "float32")
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in stack:
            tif.write(page, photometric="minisblack", compression="zlib")
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(3)]
    assert [f.meta["tiff_page"] for f in frames] == [0, 1, 2]
    for frame, expected in zip(frames, stack):
        np.testing.assert_array_equal(frame.pixels, expected)
    assert count_sections(path) == 3


def test_tiff_shaped_stack(tmp_path):
    stack = _image((5, 32, 32), "uint16")
    path = tmp_path / "shaped.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    frames = list(read_frames(path, start=3))
    assert [f.frame_id for f in frames] == [f"{path}#3", f"{path}#4"]
    np.testing.assert_array_equal(frames[1].pixels, stack[4])
    assert count_sections(path) == 5


@pytest.mark.parametrize(
    ("unit", "expected_nm"), [("nm", 0.25), ("micron", 250.0), ("\\u00B5m", 250.0), ("angstrom", 0.025)]
)
def test_tiff_imagej_unit_and_resolution(tmp_path, unit, expected_nm):
    stack = _image((2, 32, 32), "uint16")
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(4.0, 4.0), metadata={"unit": unit, "axes": "ZYX"})
    frames = list(read_frames(path))
    assert len(frames) == 2
    assert frames[0].pixel_size_nm == pytest.approx(expected_nm)
    assert frames[0].meta["pixel_size_source"] == "ImageJ unit + XResolution"
    assert frames[0].meta["imagej"]["unit"]
    _json_ok(frames[0].meta)


def test_tiff_imagej_truncated_single_ifd_stack(tmp_path):
    # ImageJ writes stacks > 4 GB with a single IFD; tifffile's truncate=True makes the same layout
    stack = _image((4, 32, 32), "uint16")
    path = tmp_path / "ijtrunc.tif"
    tifffile.imwrite(path, stack, imagej=True, truncate=True)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1  # really one IFD for four images
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(4)]
    for frame, expected in zip(frames, stack):
        np.testing.assert_array_equal(frame.pixels, expected)
    assert count_sections(path) == 4


def test_tiff_resolution_in_centimetres(tmp_path):
    path = tmp_path / "cm.tif"
    tifffile.imwrite(path, _image((32, 32), "uint16"), resolution=(1e8, 1e8), resolutionunit="CENTIMETER")
    frame = _read_one(path)
    assert frame.pixel_size_nm == pytest.approx(0.1)  # 1e8 px/cm = 0.1 nm per pixel
    assert "XResolution" in frame.meta["pixel_size_source"]


def test_tiff_display_dpi_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, _image((32, 32), "uint8"), resolution=(72, 72), resolutionunit="INCH")
    frame = _read_one(path)
    assert frame.pixel_size_nm is None
    assert "display DPI" in frame.meta["pixel_size_note"]


def test_tiff_fei_metadata_pixel_size(tmp_path):
    path = tmp_path / "talos.tif"
    fei = "[User]\nDate=03/14/2019\n[Scan]\nPixelWidth=2.5e-011\nPixelHeight=2.5e-011\n"
    tifffile.imwrite(path, _image((32, 32), "uint16"), extratags=[(34682, "s", 0, fei, True)])
    frame = _read_one(path)
    assert frame.pixel_size_nm == pytest.approx(0.025)
    assert frame.meta["pixel_size_source"] == "FEI [Scan] PixelWidth"
    assert frame.meta["fei"]["Scan"]["PixelWidth"] == pytest.approx(2.5e-11)


def test_tiff_rgb_strict_refuses_permissive_converts(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    _raises(path, r"RGB image \(3 samples per pixel\); expected a single greyscale channel \(permissive=True")
    frame = _read_one(path, permissive=True)
    assert frame.pixels.shape == (32, 32) and frame.pixels.dtype == np.uint8
    assert (frame.pixels == 76).all()  # round(0.299 * 255)
    assert frame.meta["converted_from"] == "RGB"
    assert any("converted to grey" in w for w in frame.meta["warnings"])


def test_tiff_planar_rgb_permissive(tmp_path):
    rgb = np.zeros((3, 32, 32), np.uint16)
    rgb[1] = 1000
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    frame = _read_one(path, permissive=True)
    assert (frame.pixels == 587).all()


def test_tiff_palette_strict_and_permissive(tmp_path):
    indices = np.zeros((32, 32), np.uint8)
    indices[:16] = 1
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = 65535  # index 1 is white
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    _raises(path, "palette-colour TIFF")
    frame = _read_one(path, permissive=True)
    assert frame.pixels[0, 0] == 65535 and frame.pixels[-1, -1] == 0


def test_tiff_text_file(tmp_path):
    path = tmp_path / "readme.tif"
    path.write_text("This is not an image at all.\n")
    _raises(path, "cannot read as TIFF: .*not a TIFF file")


def test_tiff_truncated(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, _image((64, 64), "uint16"))
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    _raises(path, "cannot read as TIFF")


def test_tiff_absurd_declared_size_refused_before_reading(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, shape=(30000, 30000), dtype=np.uint8)  # header claims 900 Mpx
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    os.truncate(path, offset)  # keep only header + IFD: no pixel is there to read
    _raises(path, r"declared size 30000×30000 = 900000000 pixels exceeds max_pixels")


def test_tiff_tiny(tmp_path):
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, np.zeros((1, 1), np.uint8))
    _raises(path, "only 1×1 pixels")


def test_tiff_nan_in_second_page(tmp_path):
    stack = _image((2, 32, 32), "float32")
    stack[1, :3, :3] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    err = _raises(path, r"9 non-finite pixel\(s\) \(9 NaN, 0 ±Inf\)")
    assert err.section == 1


# ============================================================================================
# PNG


def test_png_8_and_16_bit(tmp_path):
    for dtype in ("uint8", "uint16"):
        data = _image((32, 40), dtype)
        path = tmp_path / f"{dtype}.png"
        Image.fromarray(data).save(path)
        frame = _read_one(path)
        assert frame.frame_id == str(path)
        assert frame.pixels.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(frame.pixels, data)
        assert frame.pixel_size_nm is None and frame.acquired_at is None
        _json_ok(frame.meta)
        assert count_sections(path) == 1


def test_png_rgb_and_grey_alpha(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 2] = 200
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    _raises(path, r"RGB image \(3 samples per pixel\)")
    assert (_read_one(path, permissive=True).pixels == round(0.114 * 200)).all()

    la = np.zeros((32, 32, 2), np.uint8)
    la[..., 0], la[..., 1] = 42, 255
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    _raises(path, r"grey \+ alpha image")
    frame = _read_one(path, permissive=True)
    assert (frame.pixels == 42).all() and frame.meta["converted_from"] == "grey + alpha"


def test_png_palette(tmp_path):
    img = Image.fromarray(np.full((32, 32), 3, np.uint8), mode="L").convert("P")
    path = tmp_path / "pal.png"
    img.save(path)
    _raises(path, "palette-colour PNG")
    assert (_read_one(path, permissive=True).pixels == 3).all()


def test_png_text_and_jpeg_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    _raises(path, "cannot read as PNG")
    jpeg = tmp_path / "photo.png"
    Image.fromarray(_image((32, 32), "uint8")).save(jpeg, format="JPEG")
    _raises(jpeg, "cannot read as PNG")


# ============================================================================================
# Berkeley EMD (ncempy's writer)


def test_emd_single_image(tmp_path):
    data = _image((48, 32), "float32")
    path = tmp_path / "image.emd"
    ncem_emd.emdWriter(path, data, pixel_size=(0.05, 0.05), pixel_unit=("nm", "nm"))
    frame = _read_one(path)
    assert frame.frame_id == str(path)
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm == pytest.approx(0.05)
    assert frame.meta["format"] == "emd" and frame.meta["emd_group"] == "/data/converted"
    _json_ok(frame.meta)


def test_emd_stack_with_emd_style_units(tmp_path):
    stack = _image((3, 32, 32), "uint16")
    path = tmp_path / "stack.emd"
    ncem_emd.emdWriter(path, stack, pixel_size=(1, 2.0, 2.0), pixel_unit=("frame", "[A]", "[A]"))
    frames = list(read_frames(path))
    assert [f.frame_id for f in frames] == [f"{path}#{i}" for i in range(3)]
    np.testing.assert_array_equal(frames[2].pixels, stack[2])
    assert frames[0].pixel_size_nm == pytest.approx(0.2)
    assert count_sections(path) == 3


def test_emd_default_units_are_unknown(tmp_path):
    path = tmp_path / "nounit.emd"
    ncem_emd.emdWriter(path, _image((32, 32), "int16"))
    frame = _read_one(path)
    assert frame.pixel_size_nm is None
    assert "not a length" in frame.meta["pixel_size_note"]


def test_emd_not_hdf5_and_hdf5_without_emd(tmp_path):
    path = tmp_path / "text.emd"
    path.write_text("not hdf5")
    _raises(path, r"not an EMD file \(not HDF5\)")
    other = tmp_path / "other.emd"
    with h5py.File(other, "w") as h5:
        h5["Data/Image/abc/Data"] = np.zeros((4, 4))
    _raises(other, "no Berkeley EMD data group")


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
    data = _image((32, 48), "float32")
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
    frame = _read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.float32
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm == pytest.approx(0.0123)
    assert frame.acquired_at == when  # from the FILETIME, UTC
    assert frame.meta["format"] == "dm4"
    assert frame.meta["dm_tags"]["Microscope Info Voltage"] == 300000.0
    _json_ok(frame.meta)
    assert count_sections(path) == 1


def test_dm3_stack_in_micrometres_with_date_strings(tmp_path):
    stack = _image((3, 32, 32), "uint16")
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
    path.write_bytes(_dm_bytes(4, {"ImageList": [_dm_image(_image((32, 32), "int16"), 1.0, "")]}))
    frame = _read_one(path)
    assert frame.pixel_size_nm is None and frame.acquired_at is None


def test_dm_text_and_truncated(tmp_path, dm4_file):
    path = tmp_path / "notes.dm4"
    path.write_text("not a DM file, just text\n")
    _raises(path, "cannot read as DM3/DM4: File is not a valid DM3 or DM4")
    good, _, _ = dm4_file
    cut = tmp_path / "cut.dm4"
    cut.write_bytes(good.read_bytes()[:2000])
    _raises(cut, "cannot read as DM3/DM4")


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
    _raises(path, "no 2-D image in the DM file")


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
    images = _image((2, 32, 40), "float32")
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
    _json_ok(frames[0].meta)
    assert count_sections(path) == 2


def test_ser_single_image_with_emi_date(tmp_path):
    image = _image((1, 32, 32), "int16")
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
    frame = _read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.int16
    np.testing.assert_array_equal(frame.pixels, image[0])
    assert frame.pixel_size_nm == pytest.approx(0.02)
    assert frame.acquired_at == datetime(2019, 3, 14, 14, 5, 32)
    assert frame.meta["ser_header"]["AcceleratingVoltage"] == 300000
    _json_ok(frame.meta)


def test_ser_spectra_text_truncated_and_tiny(tmp_path):
    spectra = tmp_path / "eels_1.ser"
    spectra.write_bytes(_ser_bytes(_image((1, 32, 32), "float32"), 1e-10, data_type_id=0x4120))
    _raises(spectra, "SER file holds 1-D spectra, not images")

    text = tmp_path / "text_1.ser"
    text.write_text("hello, not TIA\n")
    _raises(text, "cannot read as SER")

    cut = tmp_path / "cut_1.ser"
    raw = _ser_bytes(_image((1, 64, 64), "float32"), 1e-10)
    cut.write_bytes(raw[: len(raw) // 2])  # header and offset table intact, pixels short
    _raises(cut, "truncated or corrupt SER element 0")

    tiny = tmp_path / "tiny_1.ser"
    tiny.write_bytes(_ser_bytes(_image((1, 4, 4), "float32"), 1e-10))
    _raises(tiny, "only 4×4 pixels")


def test_ser_uint8_despite_ncempy_dtype_typo(tmp_path):
    image = _image((1, 32, 32), "uint8")
    path = tmp_path / "bytes_1.ser"
    path.write_bytes(_ser_bytes(image, 1e-10))
    frame = _read_one(path)
    assert frame.pixels.dtype == np.uint8
    np.testing.assert_array_equal(frame.pixels, image[0])


def test_ser_diffraction_calibration_is_implausible(tmp_path):
    path = tmp_path / "diff_1.ser"
    path.write_bytes(_ser_bytes(_image((1, 32, 32), "float32"), 3.0e7))  # 1/m, reciprocal space
    frame = _read_one(path)
    assert frame.pixel_size_nm is None
    assert "implausible" in frame.meta["pixel_size_note"]


# ============================================================================================
# across formats


def test_supported_suffixes():
    expected = {".mrc", ".mrcs", ".st", ".ali", ".map", ".tif", ".tiff", ".dm3", ".dm4", ".ser", ".emd", ".png"}
    assert expected <= set(SUPPORTED_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "image.xyz"
    path.write_bytes(b"\0" * 100)
    err = _raises(path, r"unsupported file type '\.xyz'; supported: \.mrc")
    assert err.section is None
    with pytest.raises(ReadError, match="unsupported file type"):
        count_sections(path)


def test_suffix_is_case_insensitive(tmp_path):
    path = _write_mrc(tmp_path / "UPPER.MRC", _image((32, 32), "int16"))
    assert _read_one(path).frame_id == str(path)


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".png", ".dm4", ".ser", ".emd"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    _raises(path, r"empty file \(0 bytes\)")
    with pytest.raises(ReadError, match="empty file"):
        count_sections(path)


def test_missing_file_is_an_os_error_not_a_read_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_frames(tmp_path / "gone.mrc"))


def test_read_error_pickles_and_formats():
    err = ReadError("a/b.mrc", "bad thing", 3)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.problem, again.section) == ("a/b.mrc", "bad thing", 3)
    assert str(again) == "a/b.mrc#3: bad thing"
    assert str(ReadError("x.tif", "broken")) == "x.tif: broken"


def test_pathlike_and_str_give_the_same_ids(tmp_path):
    path = _write_mrc(tmp_path / "p.mrc", _image((2, 32, 32), "int16"))
    assert [f.frame_id for f in read_frames(path)] == [f.frame_id for f in read_frames(str(path))]


def test_big_endian_mrc_is_made_native(tmp_path):
    data = _image((32, 32), "int16")
    path = tmp_path / "be.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(">i2"))
    with mrcfile.open(path) as mrc:
        assert mrc.data.dtype.byteorder == ">"  # really big-endian on disk
    frame = _read_one(path)
    assert frame.pixels.dtype == np.dtype("int16") and frame.pixels.dtype.isnative
    np.testing.assert_array_equal(frame.pixels, data)
