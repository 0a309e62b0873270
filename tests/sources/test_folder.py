"""Folder source: SerialEM stacks caught in every mid-write state, single files, catch-up, ignores."""

import os
import time

import mrcfile
import numpy as np
import pytest
import tifffile

from latticewatch.frame import Frame, Rejected
from latticewatch.sources.folder import FolderSource
from latticewatch.testing.replay import SerialEMStack, write_single

SETTLE = 0.3
QUIET = 2.5 * SETTLE  # long enough that anything complete would have been yielded


def image(seed, shape=(64, 64)):
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


def ids(items):
    return [i.frame_id for i in items]


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def polling(request):
    return request.param


def test_serialem_section_waits_for_its_mdoc_entry(tmp_path, collect, polling):
    stack = SerialEMStack(tmp_path / "grid.mrc", pixel_size_nm=0.08)
    stack.append(image(0))
    with collect(FolderSource(tmp_path, name="f", settle_s=SETTLE, poll_interval_s=0.1, polling=polling)) as c:
        c.wait_for(1)
        section = image(1)
        stack.write_pixels(section, fraction=0.4)  # half the pixels
        time.sleep(QUIET)
        stack.finish_pixels(section, fraction=0.4)  # all pixels, header still says nz=1
        time.sleep(QUIET)
        stack.update_header()  # nz=2, mdoc not yet written
        time.sleep(QUIET)
        assert ids(c.items) == ["f:grid.mrc#0"]
        stack.write_mdoc({"TiltAngle": 12.5, "NavigatorLabel": "G3-17"})
        c.wait_for(2)
    frame = c.items[1]
    assert frame.frame_id == "f:grid.mrc#1"
    np.testing.assert_array_equal(frame.pixels, section)
    mdoc = frame.meta["mdoc"]
    assert mdoc["ZValue"] == 1 and mdoc["TiltAngle"] == 12.5 and mdoc["NavigatorLabel"] == "G3-17"
    assert frame.pixel_size_nm == pytest.approx(0.08)  # PixelSpacing 0.8 Å
    assert frame.acquired_at is not None


def test_stack_without_mdoc_waits_for_header_and_settle(tmp_path, collect):
    path = tmp_path / "plain.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(image(0)[None])
        mrc.set_image_stack()
    stack = SerialEMStack(path)
    stack.sections = 1
    with collect(FolderSource(tmp_path, name="f", settle_s=SETTLE)) as c:
        c.wait_for(1)
        # a writer that announces the section before writing it: nz=2 but bytes missing
        stack.update_header()
        stack.write_pixels(image(1), fraction=0.5)
        time.sleep(QUIET)
        assert ids(c.items) == ["f:plain.mrc#0"]
        stack.finish_pixels(image(1), fraction=0.5)
        c.wait_for(2)
        # growing further: earlier sections are never yielded again
        stack.write_pixels(image(2))
        stack.update_header()
        c.wait_for(3)
        time.sleep(QUIET)
    assert ids(c.items) == ["f:plain.mrc#0", "f:plain.mrc#1", "f:plain.mrc#2"]
    np.testing.assert_array_equal(c.items[2].pixels, image(2))


def test_single_tiff_is_read_once_when_complete(tmp_path, collect):
    data = image(5, (128, 128))
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, data, photometric="minisblack", compression="zlib")
    blob = full.read_bytes()
    full.unlink()
    with collect(FolderSource(tmp_path, name="f", settle_s=SETTLE)) as c:
        target = tmp_path / "img_0001.tif"
        with open(target, "wb") as fh:  # a slow writer: half, pause, rest
            fh.write(blob[: len(blob) // 2])
            fh.flush()
            time.sleep(SETTLE / 2)
            fh.write(blob[len(blob) // 2 :])
        c.wait_for(1)
        os.utime(target)  # touched again later: not re-read
        time.sleep(QUIET)
    assert ids(c.items) == ["f:img_0001.tif"]
    np.testing.assert_array_equal(c.items[0].pixels, data)


def test_catch_up_on_start_skips_what_is_done(tmp_path, collect):
    stack = SerialEMStack(tmp_path / "sub" / "grid.mrc", pixel_size_nm=0.05)
    (tmp_path / "sub").mkdir()
    for k in range(3):
        stack.append(image(k))
    write_single(tmp_path, 0, Frame("x", image(9), 0.05))
    done = {"f:sub/grid.mrc#0"}
    with collect(FolderSource(tmp_path, name="f", settle_s=SETTLE), skip=done.__contains__) as c:
        c.wait_for(3)
        time.sleep(QUIET)
    assert sorted(ids(c.items)) == ["f:frame_00000.mrc#0", "f:sub/grid.mrc#1", "f:sub/grid.mrc#2"]


def test_ignores_backups_hidden_and_temporary_names(tmp_path, collect):
    for name in (".hidden.mrc", "scratch.mrc.tmp", "grid.mrc.mdoc~", "notes.txt", "x.tif.part"):
        (tmp_path / name).write_bytes(b"junk" * 100)
    with collect(FolderSource(tmp_path, name="f", settle_s=0.1)) as c:
        time.sleep(0.5)
    assert c.items == []


def test_bad_file_is_rejected_once_and_left_in_place(tmp_path, collect):
    bad = tmp_path / "bad.mrc"
    with mrcfile.new(bad) as mrc:
        mrc.set_data(np.zeros((64, 64), np.uint16))
    raw = bytearray(bad.read_bytes())
    raw[12:16] = (3).to_bytes(4, "little")  # mode 3: complex int16, unsupported
    bad.write_bytes(bytes(raw))
    with collect(FolderSource(tmp_path, name="f", settle_s=0.1)) as c:
        c.wait_for(1)
        time.sleep(0.5)
    assert len(c.items) == 1 and isinstance(c.items[0], Rejected)
    assert "mode 3" in c.items[0].problem
    assert bad.read_bytes() == bytes(raw)
