"""Archive on a real, small filesystem: disk full, read-only, no partial files, recovery.

These mount a size-limited tmpfs, which needs root (or CAP_SYS_ADMIN); elsewhere they skip and
say so. The reserve and backoff tests need no mount.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from latticewatch.frame import Frame
from latticewatch.sinks.archive import ArchiveReader, ArchiveUnavailable, ArchiveWriter


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(mount_tmpfs):
    """A 1 MiB tmpfs (unmounted afterwards)."""
    return mount_tmpfs("1m")


def _remount(mountpoint: Path, mode: str) -> None:
    done = _run("mount", "-o", f"remount,{mode}", str(mountpoint))
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs {mode}: {done.stderr.strip()}")


def _noise_frame(i: int, side: int = 96) -> Frame:
    # Uniform int16 noise does not compress: every frame costs its full ~18 KiB.
    pixels = np.random.default_rng(i).integers(-32768, 32767, (side, side), dtype=np.int16)
    return Frame(f"run/frame_{i:03d}.mrc", pixels, pixel_size_nm=0.05)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name == ".probe"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_full_leaves_no_partial_file_and_resumes(small_fs, tmp_path):
    sources = tmp_path / "sources"
    sources.mkdir()
    frames = [_noise_frame(i) for i in range(80)]
    hashes = {}
    for f in frames[:3]:
        path = sources / f"{f.frame_id.rsplit('/', 1)[-1]}"
        with mrcfile.new(path) as mrc:
            mrc.set_data(f.pixels)
        hashes[path] = _sha(path)

    writer = ArchiveWriter(small_fs, "s", reduce=False, min_free_bytes=0, retry_after_s=0, max_bytes=10**12)
    archived = []
    with pytest.raises(ArchiveUnavailable) as info:
        for f in frames:
            archived.append(writer.write(f, None))
    exc = info.value
    assert exc.reason == "no_space" and exc.errno == errno.ENOSPC
    assert 10 < len(archived) < len(frames)
    assert not writer.available and writer.unavailable_since is not None
    assert writer.counters.failures == 1

    # No partial file, and everything reported archived is complete and bit-exact.
    assert _leftovers(small_fs) == []
    reader = ArchiveReader(small_fs / "s")
    assert [e.frame_id for e in reader.entries()] == [r.frame_id for r in archived]
    for receipt, frame in zip(archived, frames, strict=False):
        assert np.array_equal(reader.read(receipt.key).pixels(), frame.pixels)

    # Still full: the next write fails the same clean way.
    failed = frames[len(archived)]
    with pytest.raises(ArchiveUnavailable):
        writer.write(failed, None)
    assert _leftovers(small_fs) == []
    assert writer.probe() is False

    # Space returns (an operator moves data away): archiving resumes by itself.
    for receipt in archived[:5]:
        receipt.path.unlink()
    receipt = writer.write(failed, None)
    assert writer.available and writer.unavailable_since is None
    assert np.array_equal(ArchiveReader(small_fs / "s").read(receipt.key).pixels(), failed.pixels)
    writer.close()  # rotation needs as much space again as the segments: deferred, nothing lost
    assert _leftovers(small_fs) == []
    assert len(ArchiveReader(small_fs / "s")) == len(archived) - 5 + 1
    assert {p: _sha(p) for p in hashes} == hashes  # sources untouched


def test_enospc_from_the_write_itself_is_cleaned_up(small_fs, monkeypatch):
    # Defeat the free-space pre-check so that the kernel's ENOSPC hits mid-write.
    monkeypatch.setattr(ArchiveWriter, "_check_space", lambda self, nbytes: None)
    writer = ArchiveWriter(small_fs, "s", reduce=False, retry_after_s=0, max_bytes=10**12)
    written = 0
    with pytest.raises(ArchiveUnavailable) as info:
        for i in range(100):
            writer.write(_noise_frame(i), None)
            written += 1
    assert info.value.reason == "no_space" and info.value.errno == errno.ENOSPC
    assert _leftovers(small_fs) == []
    assert len(ArchiveReader(small_fs)) == written
    for path in list((small_fs / "s" / "segments").iterdir())[:3]:
        path.unlink()
    writer.write(_noise_frame(1000), None)
    assert writer.available and len(ArchiveReader(small_fs)) == written - 3 + 1


def test_read_only_filesystem_pauses_and_resumes(small_fs):
    writer = ArchiveWriter(small_fs, "s", reduce=False, min_free_bytes=0, retry_after_s=0)
    writer.write(_noise_frame(0, side=16), None)
    _remount(small_fs, "ro")
    try:
        with pytest.raises(ArchiveUnavailable) as info:
            writer.write(_noise_frame(1, side=16), None)
        assert info.value.reason == "read_only"
        assert writer.probe() is False
    finally:
        _remount(small_fs, "rw")
    assert _leftovers(small_fs) == []
    assert writer.probe() is True and writer.available
    writer.write(_noise_frame(2, side=16), None)
    writer.close()
    assert [e.frame_id for e in ArchiveReader(small_fs).entries()] == [
        _noise_frame(0).frame_id,
        _noise_frame(2).frame_id,
    ]


def test_permission_denied_at_session_creation(small_fs):
    # Root ignores file modes, so "permission denied" is staged as a read-only root instead.
    _remount(small_fs, "ro")
    try:
        writer = ArchiveWriter(small_fs, "fresh", reduce=False, min_free_bytes=0, retry_after_s=0)
        with pytest.raises(ArchiveUnavailable) as info:
            writer.write(_noise_frame(0, side=8), None)
        assert info.value.reason in ("read_only", "permission")
    finally:
        _remount(small_fs, "rw")
    writer.write(_noise_frame(0, side=8), None)  # resumes on the next write once writable
    writer.close()
    assert len(ArchiveReader(small_fs)) == 1


def test_permission_denied_as_non_root(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root bypasses file modes; covered by the read-only remount tests")
    root = tmp_path / "locked"
    root.mkdir(mode=0o500)
    with pytest.raises(ArchiveUnavailable) as info:
        ArchiveWriter(root, "s", reduce=False).write(_noise_frame(0, side=8), None)
    assert info.value.reason == "permission"


def test_reserve_stops_archiving_before_the_disk_is_full(tmp_path):
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    writer = ArchiveWriter(tmp_path, "s", reduce=False, min_free_bytes=free + 2**30, retry_after_s=0)
    with pytest.raises(ArchiveUnavailable) as info:
        writer.write(_noise_frame(0, side=8), None)
    assert info.value.reason == "no_space"
    assert list((tmp_path / "s" / "segments").iterdir()) == []
    writer.min_free_bytes = 0  # e.g. space was freed
    writer.write(_noise_frame(0, side=8), None)
    assert writer.available


def test_backoff_fails_fast_until_probe(tmp_path):
    st = os.statvfs(tmp_path)
    writer = ArchiveWriter(
        tmp_path, "s", reduce=False, min_free_bytes=st.f_bavail * st.f_frsize + 2**30, retry_after_s=60
    )
    with pytest.raises(ArchiveUnavailable):
        writer.write(_noise_frame(0, side=8), None)
    writer.min_free_bytes = 0
    t0 = time.perf_counter()
    with pytest.raises(ArchiveUnavailable) as info:
        writer.write(_noise_frame(0, side=8), None)  # still backing off: no disk access
    assert time.perf_counter() - t0 < 0.5 and 0 < info.value.retry_in_s <= 60
    assert writer.counters.failures == 1
    assert writer.probe() is True
    writer.write(_noise_frame(0, side=8), None)
    writer.close()
