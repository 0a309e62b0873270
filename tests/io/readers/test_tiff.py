"""TIFF (`latticewatch.io.readers.tiff`) on files written by tifffile and Pillow: pages, stacks, units, vendor tags."""

from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import pytest
import tifffile
from PIL import Image

from latticewatch.io.readers import count_sections, read_frames
from reader_files import json_ok, raises_read_error, random_image, read_one


def test_tiff_plain_single_page(tmp_path):
    data = random_image((40, 56), "uint16")
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, data, datetime=datetime(2024, 3, 14, 14, 5, 32), software="SerialEM")
    frame = read_one(path)
    assert frame.frame_id == str(path)
    assert frame.pixels.dtype == np.uint16
    np.testing.assert_array_equal(frame.pixels, data)
    assert frame.pixel_size_nm is None
    assert frame.acquired_at == datetime(2024, 3, 14, 14, 5, 32)
    tags = frame.meta["tiff_tags"]
    assert tags["Compression"] == "NONE" and tags["Software"] == "SerialEM"
    assert tags["ImageWidth"] == 56 and tags["ImageLength"] == 40
    json_ok(frame.meta)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64", "uint32"])
def test_tiff_dtypes(tmp_path, dtype):
    data = random_image((32, 32), dtype)
    path = tmp_path / f"{dtype}.tiff"
    tifffile.imwrite(path, data, photometric="minisblack")
    frame = read_one(path)
    assert frame.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(frame.pixels, data)


@pytest.mark.parametrize("compression", ["zlib", "adobe_deflate"])
def test_tiff_zip_deflate_compressed(tmp_path, compression):
    data = random_image((48, 64), "uint16")
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, data, compression=compression)
    frame = read_one(path)
    assert frame.meta["tiff_tags"]["Compression"] in ("ADOBE_DEFLATE", "DEFLATE")
    np.testing.assert_array_equal(frame.pixels, data)


@pytest.mark.parametrize(
    ("dtype", "compression"), [("uint16", "tiff_lzw"), ("float32", "tiff_lzw"), ("uint8", "tiff_adobe_deflate")]
)
def test_tiff_lzw_and_deflate_written_by_libtiff(tmp_path, dtype, compression):
    # Pillow (libtiff) writes LZW without extra packages; tifffile decodes LZW only with
    # imagecodecs, and the reader falls back to Pillow when that is missing
    stack = random_image((3, 32, 40), dtype)
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
    stack = random_image((3, 32, 32), "float32")
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
    stack = random_image((5, 32, 32), "uint16")
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
    stack = random_image((2, 32, 32), "uint16")
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(4.0, 4.0), metadata={"unit": unit, "axes": "ZYX"})
    frames = list(read_frames(path))
    assert len(frames) == 2
    assert frames[0].pixel_size_nm == pytest.approx(expected_nm)
    assert frames[0].meta["pixel_size_source"] == "ImageJ unit + XResolution"
    assert frames[0].meta["imagej"]["unit"]
    json_ok(frames[0].meta)


def test_tiff_imagej_truncated_single_ifd_stack(tmp_path):
    # ImageJ writes stacks > 4 GB with a single IFD; tifffile's truncate=True makes the same layout
    stack = random_image((4, 32, 32), "uint16")
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
    tifffile.imwrite(path, random_image((32, 32), "uint16"), resolution=(1e8, 1e8), resolutionunit="CENTIMETER")
    frame = read_one(path)
    assert frame.pixel_size_nm == pytest.approx(0.1)  # 1e8 px/cm = 0.1 nm per pixel
    assert "XResolution" in frame.meta["pixel_size_source"]


def test_tiff_display_dpi_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, random_image((32, 32), "uint8"), resolution=(72, 72), resolutionunit="INCH")
    frame = read_one(path)
    assert frame.pixel_size_nm is None
    assert "display DPI" in frame.meta["pixel_size_note"]


def test_tiff_fei_metadata_pixel_size(tmp_path):
    path = tmp_path / "talos.tif"
    fei = "[User]\nDate=03/14/2019\n[Scan]\nPixelWidth=2.5e-011\nPixelHeight=2.5e-011\n"
    tifffile.imwrite(path, random_image((32, 32), "uint16"), extratags=[(34682, "s", 0, fei, True)])
    frame = read_one(path)
    assert frame.pixel_size_nm == pytest.approx(0.025)
    assert frame.meta["pixel_size_source"] == "FEI [Scan] PixelWidth"
    assert frame.meta["fei"]["Scan"]["PixelWidth"] == pytest.approx(2.5e-11)


def test_tiff_rgb_strict_refuses_permissive_converts(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    raises_read_error(path, r"RGB image \(3 samples per pixel\); expected a single greyscale channel \(permissive=True")
    frame = read_one(path, permissive=True)
    assert frame.pixels.shape == (32, 32) and frame.pixels.dtype == np.uint8
    assert (frame.pixels == 76).all()  # round(0.299 * 255)
    assert frame.meta["converted_from"] == "RGB"
    assert any("converted to grey" in w for w in frame.meta["warnings"])


def test_tiff_planar_rgb_permissive(tmp_path):
    rgb = np.zeros((3, 32, 32), np.uint16)
    rgb[1] = 1000
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    frame = read_one(path, permissive=True)
    assert (frame.pixels == 587).all()


def test_tiff_palette_strict_and_permissive(tmp_path):
    indices = np.zeros((32, 32), np.uint8)
    indices[:16] = 1
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = 65535  # index 1 is white
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    raises_read_error(path, "palette-colour TIFF")
    frame = read_one(path, permissive=True)
    assert frame.pixels[0, 0] == 65535 and frame.pixels[-1, -1] == 0


def test_tiff_text_file(tmp_path):
    path = tmp_path / "readme.tif"
    path.write_text("This is not an image at all.\n")
    raises_read_error(path, "cannot read as TIFF: .*not a TIFF file")


def test_tiff_truncated(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, random_image((64, 64), "uint16"))
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    raises_read_error(path, "cannot read as TIFF")


def test_tiff_absurd_declared_size_refused_before_reading(tmp_path):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, shape=(30000, 30000), dtype=np.uint8)  # header claims 900 Mpx
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    os.truncate(path, offset)  # keep only header + IFD: no pixel is there to read
    raises_read_error(path, r"declared size 30000×30000 = 900000000 pixels exceeds max_pixels")


def test_tiff_tiny(tmp_path):
    path = tmp_path / "tiny.tif"
    tifffile.imwrite(path, np.zeros((1, 1), np.uint8))
    raises_read_error(path, "only 1×1 pixels")


def test_tiff_nan_in_second_page(tmp_path):
    stack = random_image((2, 32, 32), "float32")
    stack[1, :3, :3] = np.nan
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    err = raises_read_error(path, r"9 non-finite pixel\(s\) \(9 NaN, 0 ±Inf\)")
    assert err.section == 1
