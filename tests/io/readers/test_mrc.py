"""MRC stacks and volumes (`latticewatch.io.readers.mrc`) on files written by mrcfile, broken where needed."""

from __future__ import annotations

import logging
import os

import mrcfile
import numpy as np
import pytest

from latticewatch.frame import MIN_SIDE_PX
from latticewatch.io.readers import ReadError, count_sections, read_frames
from reader_files import LOGGER, json_ok, patch_mrc_header, raises_read_error, random_image, read_one, write_mrc


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [(0, "int8"), (1, "int16"), (2, "float32"), (6, "uint16"), (12, "float16")],
)
def test_mrc_every_supported_mode_keeps_dtype_and_values(tmp_path, mode, dtype):
    data = random_image((32, 48), dtype)
    path = write_mrc(tmp_path / f"mode{mode}.mrc", data, voxel_size=1.25)
    frame = read_one(path)
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
    json_ok(frame.meta)
    assert count_sections(path) == 1


def test_mrc_stack_gives_one_frame_per_section(tmp_path):
    data = random_image((4, 32, 40), "float32")
    path = write_mrc(tmp_path / "stack.mrcs", data, voxel_size=2.0)
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
    path = write_mrc(tmp_path / "lazy.mrc", random_image((3, 32, 32), "int16"))
    frames = read_frames(path)
    first = next(frames)
    assert first.frame_id.endswith("#0")
    frames.close()  # abandoning the iterator closes the file


def test_mrc_volume_sections_are_frames_too(tmp_path):
    path = write_mrc(tmp_path / "tomo.rec", random_image((2, 32, 32), "float32"))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.set_volume()
    assert [f.frame_id for f in read_frames(path)] == [f"{path}#0", f"{path}#1"]


def test_mrc_voxel_size_unset_is_none(tmp_path):
    path = write_mrc(tmp_path / "unset.mrc", random_image((32, 32), "float32"))  # mrcfile default: 0
    frame = read_one(path)
    assert frame.pixel_size_nm is None
    assert "unset" in frame.meta["pixel_size_note"]


def test_mrc_imod_default_voxel_size_one_is_none(tmp_path, caplog):
    path = write_mrc(tmp_path / "imod.mrc", random_image((32, 32), "float32"), voxel_size=1.0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        frame = read_one(path)
    assert frame.pixel_size_nm is None
    assert "IMOD" in frame.meta["pixel_size_note"]
    assert "IMOD" in caplog.text


def test_mrc_non_square_voxels_strict_and_permissive(tmp_path):
    path = write_mrc(tmp_path / "aniso.mrc", random_image((32, 32), "float32"), voxel_size=(2.0, 3.0, 1.0))
    raises_read_error(path, "non-square pixels")
    frame = read_one(path, permissive=True)
    assert frame.pixel_size_nm == pytest.approx(0.2)
    assert any("non-square" in w for w in frame.meta["warnings"])


@pytest.mark.parametrize(
    ("mode", "name"), [(3, "complex int16"), (4, "complex float32"), (101, "4-bit packed"), (7, "unknown")]
)
def test_mrc_unsupported_mode(tmp_path, mode, name):
    path = tmp_path / f"bad{mode}.mrc"
    if mode == 4:  # mrcfile writes mode 4 from complex64 data: a genuine file
        write_mrc(path, np.ones((32, 32), np.complex64))
    else:
        write_mrc(path, random_image((32, 32), "int16"))
        patch_mrc_header(path, mode=mode)
    for permissive in (False, True):
        expected = rf"unsupported MRC mode {mode} \({name}\); supported: 0, 1, 2, 6, 12"
        err = raises_read_error(path, expected, permissive=permissive)
        assert err.section is None
    with pytest.raises(ReadError, match="unsupported MRC mode"):
        count_sections(path)


def test_mrc_truncated_stack_strict_refuses_permissive_reads_complete_sections(tmp_path, caplog):
    data = random_image((3, 32, 32), "float32")
    path = write_mrc(tmp_path / "cut.mrc", data)
    # cut in the middle of section 2, as a copy interrupted mid-way would
    os.truncate(path, 1024 + 2 * 32 * 32 * 4 + 100)
    err = raises_read_error(path, r"truncated: the header declares 3 section\(s\) of 32×32 float32")
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
    path = write_mrc(tmp_path / "cut1.mrc", random_image((32, 32), "int16"))
    os.truncate(path, 1024 + 10)
    raises_read_error(path, "truncated")
    raises_read_error(path, "not one section is complete", permissive=True)


def test_mrc_header_only_fragment(tmp_path):
    path = write_mrc(tmp_path / "frag.mrc", random_image((32, 32), "int16"))
    os.truncate(path, 500)
    raises_read_error(path, "not a valid MRC file.*enough bytes for MRC header")


def test_mrc_file_longer_than_declared_warns(tmp_path):
    path = write_mrc(tmp_path / "long.mrc", random_image((32, 32), "int16"))
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)
    frame = read_one(path)
    assert any("64 bytes longer" in w for w in frame.meta["warnings"])


def test_mrc_not_an_mrc_file(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("these are my notes, not a map\n" * 60)
    raises_read_error(path, "not a valid MRC file: Map ID string not found")


def test_mrc_bad_map_id_permissive_guesses(tmp_path):
    data = random_image((32, 32), "int16")
    path = write_mrc(tmp_path / "badmap.mrc", data)
    patch_mrc_header(path, map=b"XXXX")
    raises_read_error(path, "Map ID string not found")
    frame = read_one(path, permissive=True)
    np.testing.assert_array_equal(frame.pixels, data)
    assert any("Map ID" in w for w in frame.meta["warnings"])


def test_mrc_absurd_declared_size_is_refused_before_reading(tmp_path):
    path = write_mrc(tmp_path / "huge.mrc", random_image((32, 32), "int8"))
    patch_mrc_header(path, nx=40000, ny=40000, mx=40000, my=40000)
    # the file holds 1 KiB of data: had it been read first, this would be a truncation error
    err = raises_read_error(path, r"declared size 40000×40000 = 1600000000 pixels exceeds max_pixels")
    assert "truncated" not in str(err)
    with pytest.raises(ReadError, match="exceeds max_pixels"):
        count_sections(path, permissive=True)


def test_mrc_max_pixels_is_configurable(tmp_path):
    path = write_mrc(tmp_path / "small.mrc", random_image((64, 64), "int16"))
    raises_read_error(path, "exceeds max_pixels=1000", max_pixels=1000)


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (16, 4)])
def test_tiny_frames_are_refused(tmp_path, shape):
    path = write_mrc(tmp_path / "tiny.mrc", random_image(shape, "int16"))
    for permissive in (False, True):
        expected = rf"only {shape[1]}×{shape[0]} pixels; the minimum is {MIN_SIDE_PX}×{MIN_SIDE_PX}"
        raises_read_error(path, expected, permissive=permissive)


def test_mrc_invalid_dimensions(tmp_path):
    path = write_mrc(tmp_path / "zero.mrc", random_image((32, 32), "int16"))
    patch_mrc_header(path, nz=0)
    raises_read_error(path, "invalid dimensions in header: nx=32, ny=32, nz=0")


def test_nan_and_inf_strict_names_the_count(tmp_path):
    data = random_image((32, 32), "float32")
    data[0, :2] = np.nan
    data[5, 5] = np.inf
    path = write_mrc(tmp_path / "nan.mrc", data)
    err = raises_read_error(path, r"3 non-finite pixel\(s\) \(2 NaN, 1 ±Inf\) of 1024")
    assert err.section is None


def test_nan_permissive_replaces_by_median(tmp_path, caplog):
    data = random_image((32, 32), "float32")
    data[3, 3] = np.nan
    data[4, 4] = -np.inf
    finite = data[np.isfinite(data)]
    median = float(np.median(finite))
    path = write_mrc(tmp_path / "nanp.mrc", data)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        frame = read_one(path, permissive=True)
    assert np.isfinite(frame.pixels).all()
    assert frame.pixels.dtype == np.float32
    assert frame.pixels[3, 3] == pytest.approx(median) and frame.pixels[4, 4] == pytest.approx(median)
    assert frame.meta["nonfinite_pixels"] == 2
    assert any("replaced by the median" in w for w in frame.meta["warnings"])
    assert any(r.name.startswith(LOGGER + ".") and "non-finite" in r.getMessage() for r in caplog.records)
    json_ok(frame.meta)


def test_all_nan_is_refused_even_permissive(tmp_path):
    path = write_mrc(tmp_path / "allnan.mrc", np.full((32, 32), np.nan, np.float32))
    raises_read_error(path, "no finite pixel left", permissive=True)


def test_bad_section_in_stack_names_the_section_and_reading_can_resume(tmp_path):
    data = random_image((3, 32, 32), "float32")
    data[1, 0, 0] = np.nan
    path = write_mrc(tmp_path / "badsec.mrc", data)
    frames = read_frames(path)
    assert next(frames).frame_id == f"{path}#0"
    with pytest.raises(ReadError) as info:
        next(frames)
    err = info.value
    assert err.section == 1
    assert str(err).startswith(f"{path}#1: 1 non-finite pixel")
    rest = list(read_frames(path, start=err.section + 1))
    assert [f.frame_id for f in rest] == [f"{path}#2"]
