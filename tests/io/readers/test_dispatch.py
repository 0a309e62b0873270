"""What holds across formats (`latticewatch.io.readers.dispatch`): suffixes, empty and missing files, `ReadError`."""

from __future__ import annotations

import pickle

import mrcfile
import numpy as np
import pytest

from latticewatch.io.readers import SUPPORTED_SUFFIXES, ReadError, count_sections, read_frames
from reader_files import raises_read_error, random_image, read_one, write_mrc


def test_supported_suffixes():
    expected = {".mrc", ".mrcs", ".st", ".ali", ".map", ".tif", ".tiff", ".dm3", ".dm4", ".ser", ".emd", ".png"}
    assert expected <= set(SUPPORTED_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "image.xyz"
    path.write_bytes(b"\0" * 100)
    err = raises_read_error(path, r"unsupported file type '\.xyz'; supported: \.mrc")
    assert err.section is None
    with pytest.raises(ReadError, match="unsupported file type"):
        count_sections(path)


def test_suffix_is_case_insensitive(tmp_path):
    path = write_mrc(tmp_path / "UPPER.MRC", random_image((32, 32), "int16"))
    assert read_one(path).frame_id == str(path)


@pytest.mark.parametrize("suffix", [".mrc", ".tif", ".png", ".dm4", ".ser", ".emd"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    raises_read_error(path, r"empty file \(0 bytes\)")
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
    path = write_mrc(tmp_path / "p.mrc", random_image((2, 32, 32), "int16"))
    assert [f.frame_id for f in read_frames(path)] == [f.frame_id for f in read_frames(str(path))]


def test_big_endian_mrc_is_made_native(tmp_path):
    data = random_image((32, 32), "int16")
    path = tmp_path / "be.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(">i2"))
    with mrcfile.open(path) as mrc:
        assert mrc.data.dtype.byteorder == ">"  # really big-endian on disk
    frame = read_one(path)
    assert frame.pixels.dtype == np.dtype("int16") and frame.pixels.dtype.isnative
    np.testing.assert_array_equal(frame.pixels, data)
