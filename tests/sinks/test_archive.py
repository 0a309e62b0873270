"""Archive: the HDF5 layout, the writer and the reader, and the README's plain-h5py snippet."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from archive_frames import disc_mask, make_analysis, noisy_frame, reference_keep, same_bits
from latticewatch.frame import Analysis, Frame
from latticewatch.sinks.archive import (
    ArchiveError,
    ArchiveReader,
    ArchiveWriter,
    UncertaintyRule,
    archive_stats,
    frame_key,
)
from latticewatch.sinks.archive.bench import synthetic_frame


def test_write_and_read_back_everything(tmp_path):
    pixels = noisy_frame((96, 80), seed=3, dtype=np.uint16)
    mask = disc_mask(pixels.shape, (40, 30), 12)
    acquired = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    frame = Frame("run1/img_001.mrc", pixels, pixel_size_nm=0.05, acquired_at=acquired,
                  meta={"mdoc": {"TiltAngle": 0.0, "Magnification": 490000}}, origin="/data/run1/img_001.mrc")
    analysis = make_analysis(mask)
    with ArchiveWriter(tmp_path, "s1", policy="mean", margin_nm=0.2, fsync=False) as writer:
        receipt = writer.write(frame, analysis, {"source": "folder"})
        assert receipt.path.exists() and receipt.path.parent.name == "segments"
        assert receipt.key == frame_key(frame.frame_id) and not receipt.lossless
    # close() rotated the segment into the first volume
    assert sorted(p.name for p in (tmp_path / "s1").glob("*.h5")) == ["s1-0001.h5"]
    assert list((tmp_path / "s1" / "segments").iterdir()) == []

    reader = ArchiveReader(tmp_path / "s1")
    (entry,) = reader.entries()
    assert entry.frame_id == frame.frame_id and entry.policy == "mean" and entry.shape == (96, 80)
    got = reader.read("img_001.mrc")  # by file name
    assert reader.read(entry.key).frame_id == frame.frame_id
    out = got.pixels()
    keep = reference_keep(mask, 0, 4)  # 0.2 nm at 0.05 nm/px
    assert np.array_equal(out[keep], pixels[keep]) and out.dtype == np.uint16
    assert np.array_equal(got.mask(), mask)
    assert got.meta == frame.meta and got.origin == frame.origin
    assert got.pixel_size_nm == 0.05 and got.acquired_at == acquired.isoformat()
    assert got.analysis["model_ids"] == {"unet": "np-unet@1.0"}
    (region,) = got.analysis["regions"]
    assert region["label"] == "stacking_fault" and region["features"]["fft_peak"] == 1.5
    assert (region["row0"], region["col1"]) == (2, 12) and region["touches_edge"] == 0
    prov = got.provenance
    assert prov["source"] == "folder" and prov["profile"] == "nanoparticles"
    assert prov["archive"]["policy"] == "mean" and prov["archive"]["margin_px"] == 4
    assert prov["archive"]["margin_unit"] == "nm" and "numpy" in prov["versions"]


@pytest.mark.parametrize(
    ("kwargs", "analysis_kw", "reason"),
    [
        ({}, {"confidence": 0.3}, "mean confidence"),
        ({}, {"confidence": float("nan")}, "mean confidence"),
        ({"reduce": False}, {}, "reduce = false"),
        ({"uncertainty": UncertaintyRule(min_mean_confidence=None, on_warnings=True)}, {"warnings": ("odd",)}, "odd"),
        ({}, None, "no analysis"),
    ],
)
def test_safety_valve_archives_whole_and_lossless(tmp_path, kwargs, analysis_kw, reason):
    pixels = noisy_frame((40, 50), seed=5)
    mask = disc_mask(pixels.shape, (20, 20), 6)
    analysis = None if analysis_kw is None else make_analysis(mask, **analysis_kw)
    with ArchiveWriter(tmp_path, "s", fsync=False, **kwargs) as writer:
        receipt = writer.write(Frame("f", pixels, pixel_size_nm=0.05), analysis)
    assert receipt.lossless and reason in receipt.lossless_reason
    got = ArchiveReader(tmp_path).read("f")
    assert same_bits(got.pixels(), pixels)
    assert got.provenance["archive"]["lossless_reason"] == receipt.lossless_reason
    assert archive_stats(tmp_path)["lossless_frames"] == 1


def test_uncertain_pixel_fraction_rule():
    mask = np.zeros((10, 10), np.uint8)
    analysis = make_analysis(mask)
    prob = np.zeros((10, 10), np.float32)
    prob[:3] = 0.5
    analysis = Analysis(**{**analysis.__dict__, "probability": prob})
    assert UncertaintyRule(max_uncertain_fraction=0.5).reason_for(analysis) is None
    assert "30.0%" in UncertaintyRule(max_uncertain_fraction=0.1).reason_for(analysis)
    rule = UncertaintyRule.from_mapping({"min_mean_confidence": 0.5, "uncertain_band": [0.1, 0.9]})
    assert rule.uncertain_band == (0.1, 0.9)
    with pytest.raises(ValueError, match="unknown"):
        UncertaintyRule.from_mapping({"min_confidence": 0.5})


def test_mask_of_the_wrong_shape_is_archived_lossless(tmp_path):
    pixels = noisy_frame((20, 30))
    with ArchiveWriter(tmp_path, "s", fsync=False) as writer:
        receipt = writer.write(Frame("f", pixels), make_analysis(np.zeros((10, 15), np.uint8)))
    assert receipt.lossless and "mask shape" in receipt.lossless_reason
    assert same_bits(ArchiveReader(tmp_path).read("f").pixels(), pixels)


def test_unknown_pixel_size_takes_the_margin_as_pixels(tmp_path):
    pixels = noisy_frame((30, 30))
    mask = np.zeros((30, 30), np.uint8)
    mask[15, 15] = 1
    with ArchiveWriter(tmp_path, "s", margin_nm=2, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=None), make_analysis(mask, pixel_size_nm=None))
    got = ArchiveReader(tmp_path).read("f")
    assert got.provenance["archive"]["margin_unit"] == "px"
    assert "pixel size unknown" in got.provenance["archive"]["note"]
    assert got.reduced.n_exact == 25  # a 5x5 square: radius 2 px
    assert got.pixel_size_nm is None


def test_graphene_profile_reduces_class_one(tmp_path):
    pixels = noisy_frame((32, 32))
    mask = disc_mask(pixels.shape, (16, 16), 8)  # 1 = contamination: the low-value class here
    with ArchiveWriter(tmp_path, "g", low_value_class=1, margin_nm=0, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=0.05), make_analysis(mask, profile="graphene"))
    out = ArchiveReader(tmp_path).read("f").pixels()
    assert np.array_equal(out[mask == 0], pixels[mask == 0])
    assert (out[mask == 1] == 0).all()


def test_rotation_by_size_and_by_age(tmp_path):
    frames = [Frame(f"f{i}", noisy_frame((24, 24), seed=i), pixel_size_nm=0.05) for i in range(5)]
    with ArchiveWriter(tmp_path, "s", max_bytes=1, reduce=False, fsync=False) as writer:
        for f in frames[:3]:
            writer.write(f, None)
        assert writer.pending_segments == 0 and writer.counters.rotations == 3
    with ArchiveWriter(tmp_path, "s", max_age_s=0, reduce=False, fsync=False) as writer:
        writer.write(frames[3], None)
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        writer.write(frames[4], None)
    volumes = sorted(p.name for p in (tmp_path / "s").glob("*.h5"))
    assert volumes == [f"s-{i:04d}.h5" for i in range(1, 6)]
    reader = ArchiveReader(tmp_path / "s")
    assert [e.frame_id for e in reader.entries()] == [f.frame_id for f in frames]
    for f in frames:
        assert same_bits(reader.read(f.frame_id).pixels(), f.pixels)


def test_recovery_after_crashes(tmp_path):
    session = tmp_path / "s"
    frames = [Frame(f"f{i}", noisy_frame((16, 16), seed=i)) for i in range(3)]
    writer = ArchiveWriter(tmp_path, "s", reduce=False, fsync=False, max_bytes=10**12)
    for f in frames:
        writer.write(f, None)
    saved = tmp_path / "saved_segment.h5"
    shutil.copy(session / "segments" / f"{frame_key('f0')}.h5", saved)
    writer.close()  # rotates all three into s-0001.h5
    # Crash 1: the volume's rename happened but the segment was not yet deleted.
    shutil.copy(saved, session / "segments" / f"{frame_key('f0')}.h5")
    # Crash 2: temporaries of an interrupted segment write and an interrupted rotation.
    (session / "segments" / ".abc.h5.tmp-1-deadbeef").write_bytes(b"partial")
    (session / ".s-0002.h5.tmp-1-deadbeef").write_bytes(b"partial")
    reader = ArchiveReader(session)
    assert len(reader) == 3  # the duplicate is listed once
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        writer.write(Frame("f3", noisy_frame((16, 16), seed=3)), None)
        assert sorted(p.name for p in (session / "segments").iterdir()) == [f"{frame_key('f3')}.h5"]
        assert not list(session.glob(".*.tmp-*"))
    assert sorted(p.name for p in session.glob("*.h5")) == ["s-0001.h5", "s-0002.h5"]
    assert [e.frame_id for e in ArchiveReader(session).entries()] == ["f0", "f1", "f2", "f3"]


def test_archiving_a_frame_again_keeps_the_newest_copy(tmp_path):
    first = noisy_frame((16, 16), seed=1)
    second = noisy_frame((16, 16), seed=2)
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        writer.write(Frame("same", first), None)
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        writer.write(Frame("same", second), None)
        # before rotation: one volume copy and one newer segment
        assert same_bits(ArchiveReader(tmp_path).read("same").pixels(), second)
    reader = ArchiveReader(tmp_path)
    assert len(reader) == 1 and same_bits(reader.read("same").pixels(), second)


def test_a_session_has_one_writer(tmp_path):
    frame = Frame("f", noisy_frame((8, 8)))
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as first:
        first.write(frame, None)
        second = ArchiveWriter(tmp_path, "s", reduce=False, fsync=False)
        with pytest.raises(ArchiveError, match="in use"):
            second.write(frame, None)
    with pytest.raises(ArchiveError, match="session name"):
        ArchiveWriter(tmp_path, "../escape")


def test_stats_add_up(tmp_path):
    with ArchiveWriter(tmp_path, "s", policy="drop", margin_nm=0.1, fsync=False) as writer:
        for i, cov in enumerate((0.05, 0.3)):
            pixels, mask = synthetic_frame(256, cov, pixel_size_nm=0.05, seed=i)
            writer.write(Frame(f"f{i}", pixels, pixel_size_nm=0.05), make_analysis(mask))
        writer.write(Frame("whole", noisy_frame((64, 64))), None)
    stats = archive_stats(tmp_path, per_frame=True)
    assert stats["frames"] == 3 and stats["files"] == 1 and stats["lossless_frames"] == 1
    assert sum(stats["components"].values()) == stats["stored_bytes"]
    assert stats["raw_bytes"] == 2 * 256 * 256 * 2 + 64 * 64 * 2
    assert stats["ratio"] == pytest.approx(stats["raw_bytes"] / stats["stored_bytes"])
    assert stats["policies"] == {"drop": 2, "lossless": 1}
    assert all(stats["components"][k] > 0 for k in ("mask", "exact_pixels", "exact_runs", "metadata", "index"))
    ratios = {row["frame_id"]: row["ratio"] for row in stats["frame_list"]}
    assert ratios["f0"] > ratios["f1"] > 1


REPO = Path(__file__).resolve().parents[2]


def docs_snippet() -> str:
    """The "Reading it with plain h5py" block of the README's archive section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if 'f["frames"][key]' in block and "low_bytes" in block:
            return block
    pytest.fail("the plain-h5py snippet of the archive docs was not found in README.md")


@pytest.mark.parametrize(
    "policy", ["drop", "drop:100", "mean", "quantize:1", "quantize:3", "quantize:4", "quantize:10"]
)
def test_docs_snippet_reads_the_layout_with_plain_h5py(tmp_path, policy):
    pixels, mask = synthetic_frame(128, 0.2, pixel_size_nm=0.05, seed=1)
    with ArchiveWriter(tmp_path, "session-1", policy=policy, margin_nm=0.1, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=0.05, meta={"mdoc": {"TiltAngle": 0}}), make_analysis(mask))
    # A fresh interpreter, as a reader without latticewatch has: the snippet must load the filters itself.
    keep = 'np.save("frame.npy", frame); print(json.dumps(meta)); print(regions["label"][0].decode())'
    out = subprocess.run([sys.executable, "-c", docs_snippet() + keep], cwd=tmp_path / "session-1",
                         capture_output=True, text=True, check=True).stdout.splitlines()
    expected = ArchiveReader(tmp_path).read("f").pixels()
    assert same_bits(np.load(tmp_path / "session-1" / "frame.npy"), expected)
    assert json.loads(out[-2]) == {"mdoc": {"TiltAngle": 0}}
    assert out[-1] == "stacking_fault"
