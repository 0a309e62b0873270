"""Folder source against hostile files: odd names, FIFOs, links out, long paths, bad mdocs, absurd MRC headers.

Every case is a real file in a real watched folder; each gives frames or ONE `Rejected` naming the
input and the reason, and the good file written next to it still arrives.
"""

import os
import resource
import struct
import time

import mrcfile
import numpy as np
import pytest
import tifffile

from latticewatch.frame import Frame, Rejected
from latticewatch.io.mdoc import MAX_MDOC_BYTES
from latticewatch.sources.folder import FolderSource

SETTLE = 0.2


def image(seed, shape=(64, 64)):
    return np.random.default_rng(seed).integers(0, 60000, shape, dtype=np.uint16)


def source(folder):
    return FolderSource(folder, name="f", settle_s=SETTLE, poll_interval_s=0.1)


def write_stack(path, n, pixel_size_nm=0.05):
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.stack([image(k) for k in range(n)]))
        mrc.set_image_stack()
        mrc.voxel_size = pixel_size_nm * 10


def mdoc_text(sections, spacing="0.5"):
    return f"PixelSpacing = {spacing}\n" + "".join(f"\n[ZValue = {z}]\nTiltAngle = {z}.0\n" for z in sections)


def collect_until(c, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate(c.items) and time.monotonic() < deadline:
        assert c.error is None, c.error
        time.sleep(0.05)
    time.sleep(3 * SETTLE)  # and nothing more arrives
    return list(c.items)


def rejected(items):
    return {i.frame_id: i.problem for i in items if isinstance(i, Rejected)}


def frames(items):
    return {i.frame_id: i for i in items if isinstance(i, Frame)}


def test_a_name_that_is_not_utf8_gets_an_escaped_id_and_reads_again(tmp_path, collect):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 \xff.tif")
    tifffile.imwrite(os.fsdecode(raw), image(1))  # a str with surrogates names the raw bytes
    src = source(tmp_path)
    with collect(src) as c:
        items = collect_until(c, lambda got: len(got) >= 1)
    [frame] = items
    assert frame.frame_id == "f:caf\\xe9 \\xff.tif" and frame.origin.endswith("caf\\xe9 \\xff.tif")
    frame.frame_id.encode("utf-8"), frame.origin.encode("utf-8")  # storable in SQLite, JSON, HDF5
    again = src.reread(frame.frame_id)  # the archive backlog finds the file from the escaped id
    np.testing.assert_array_equal(again.pixels, image(1))


def test_fifo_socket_and_folder_named_like_frames_are_never_opened(tmp_path, collect):
    import socket

    os.mkfifo(tmp_path / "named_pipe.mrc")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "socket.tif"))
    (tmp_path / "folder.mrc").mkdir()
    tifffile.imwrite(tmp_path / "folder.mrc" / "inside.tif", image(2))
    tifffile.imwrite(tmp_path / "good.tif", image(3))
    try:
        with collect(source(tmp_path)) as c:  # `close` fails if the source is stuck in a FIFO's open
            items = collect_until(c, lambda got: len(got) >= 4)
    finally:
        sock.close()
    assert set(frames(items)) == {"f:good.tif", "f:folder.mrc/inside.tif"}
    problems = rejected(items)
    assert set(problems) == {"f:named_pipe.mrc", "f:socket.tif"}
    assert "FIFO" in problems["f:named_pipe.mrc"] and "socket" in problems["f:socket.tif"]
    assert all("never opened" in p for p in problems.values())


def test_a_link_out_of_the_folder_is_refused_a_link_inside_is_followed(tmp_path, collect):
    watched, outside = tmp_path / "watched", tmp_path / "secret"
    watched.mkdir(), outside.mkdir()
    tifffile.imwrite(outside / "private.tif", image(4))
    tifffile.imwrite(watched / "real.tif", image(5))
    (watched / "escape.tif").symlink_to(outside / "private.tif")
    (watched / "alias.tif").symlink_to(watched / "real.tif")
    with collect(source(watched)) as c:
        items = collect_until(c, lambda got: len(got) >= 3)
    assert set(frames(items)) == {"f:real.tif", "f:alias.tif"}
    [(fid, problem)] = rejected(items).items()
    assert fid == "f:escape.tif" and "outside the watched folder" in problem and "private.tif" in problem


def test_a_path_longer_than_path_max_is_an_error_not_silence(tmp_path, collect):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:  # 20 folders of 250 characters: every name is legal, the path is not (PATH_MAX 4096)
        for _ in range(20):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.tif", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"II*\0")
        os.close(out)
    finally:
        os.close(fd)
    tifffile.imwrite(tmp_path / "good.tif", image(6))
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 2)
    assert set(frames(items)) == {"f:good.tif"}
    [(fid, problem)] = rejected(items).items()
    assert fid.startswith("f:ddd") and fid.endswith("/") and "cannot be listed" in problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its mode")
def test_an_unreadable_file_is_an_error_left_in_place(tmp_path, collect):
    path = tmp_path / "locked.tif"
    tifffile.imwrite(path, image(7))
    path.chmod(0)
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 1)
    assert "permission denied" in rejected(items)["f:locked.tif"] and path.exists()


def test_mdoc_without_a_final_newline_still_gives_its_last_section(tmp_path, collect):
    write_stack(tmp_path / "grid.mrc", 3)
    (tmp_path / "grid.mrc.mdoc").write_text(mdoc_text(range(3)).rstrip("\n"))
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 3)
    assert sorted(frames(items)) == ["f:grid.mrc#0", "f:grid.mrc#1", "f:grid.mrc#2"]
    assert frames(items)["f:grid.mrc#2"].meta["mdoc"]["TiltAngle"] == 2.0


@pytest.mark.parametrize("content, reason", [
    (bytes(range(256)) * 40, "no [ZValue = N] section"),
    (b"PixelSpacing = 1\n" + b"x" * (MAX_MDOC_BYTES + 1), "is not an mdoc"),
], ids=["garbage", "too large"])
def test_an_unusable_mdoc_is_one_error_and_its_stack_is_analysed_without_it(tmp_path, collect, content, reason):
    write_stack(tmp_path / "grid.mrc", 2)
    (tmp_path / "grid.mrc.mdoc").write_bytes(content)
    start = time.monotonic()
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 3)
    assert time.monotonic() - start < 10
    assert sorted(frames(items)) == ["f:grid.mrc#0", "f:grid.mrc#1"]
    [(fid, problem)] = rejected(items).items()
    assert fid == "f:grid.mrc.mdoc" and reason in problem and "analysed without it" in problem


def test_an_mdoc_pointing_past_the_stack_gives_one_error_per_missing_section(tmp_path, collect):
    write_stack(tmp_path / "grid.mrc", 2)
    (tmp_path / "grid.mrc.mdoc").write_text(mdoc_text(range(4)))
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 4)
    assert sorted(frames(items)) == ["f:grid.mrc#0", "f:grid.mrc#1"]
    problems = rejected(items)
    assert sorted(problems) == ["f:grid.mrc#2", "f:grid.mrc#3"]
    assert "holds only 2 section(s)" in problems["f:grid.mrc#3"]
    assert len(items) == 4  # once each


def test_mdoc_pixel_spacing_is_passed_on_with_where_it_came_from(tmp_path, collect):
    write_stack(tmp_path / "grid.mrc", 1)
    (tmp_path / "grid.mrc.mdoc").write_text(mdoc_text([0], spacing="nan"))
    with collect(source(tmp_path)) as c:
        [frame] = collect_until(c, lambda got: len(got) >= 1)
    # the analyser refuses it (test_hostile_files_daemon); the source says where it came from
    assert np.isnan(frame.pixel_size_nm) and "PixelSpacing" in frame.meta["pixel_size_source"]


def test_mrc_declaring_a_huge_extended_header_is_refused_without_growing(tmp_path, collect):
    path = tmp_path / "absurd.mrc"
    write_stack(path, 1)
    header = bytearray(path.read_bytes())
    struct.pack_into("<i", header, 92, 2**31 - 1)  # nsymbt
    path.write_bytes(header)
    tifffile.imwrite(tmp_path / "good.tif", image(8))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = time.process_time()
    with collect(source(tmp_path)) as c:
        items = collect_until(c, lambda got: len(got) >= 2)
        time.sleep(1.0)  # idle: nothing to look at any more
    assert set(frames(items)) == {"f:good.tif"}
    assert "extended header of 2147483647 bytes" in rejected(items)["f:absurd.mrc"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: no 2 GB buffer
    assert time.process_time() - cpu < 2.0  # not a busy loop


def test_a_stalled_stack_waits_without_reading_its_header_again(tmp_path, collect, monkeypatch):
    import latticewatch.sources.folder as folder

    path = tmp_path / "stalled.mrc"
    write_stack(path, 1)
    with mrcfile.open(path, "r+") as mrc:
        mrc.header.nz = 5  # announced, never written
    looks = []
    real = folder.mrc_layout
    monkeypatch.setattr(folder, "mrc_layout", lambda p: looks.append(p) or real(p))
    with collect(source(tmp_path)) as c:
        time.sleep(8 * SETTLE)
    assert c.items == []  # waits for the announced sections, however long (documented)
    assert len(looks) < 8  # a few until it settled, then none while nothing changes
