"""Archive: reduce/restore properties, the HDF5 layout, the writer, the reader and the commands."""

from __future__ import annotations

import json
import math
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import hypothesis.extra.numpy as hnp
import mrcfile
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from latticewatch.frame import Analysis, Frame, Region
from latticewatch.sinks.archive import (
    ArchiveError,
    ArchiveReader,
    ArchiveWriter,
    Codec,
    UncertaintyRule,
    archive_stats,
    decode_frame_file,
    encode_frame_file,
    frame_key,
)
from latticewatch.sinks.archive.bench import run_archive_bench, synthetic_frame
from latticewatch.sinks.archive.reduce import (
    Policy,
    margin_to_pixels,
    reduce_frame,
    restore_mask,
    restore_pixels,
)
from latticewatch.sinks.archive.runs import dilate_square, run_lengths, runs_to_bool

DTYPES = ["i1", "u1", "<i2", ">i2", "<u2", ">u2", "<i4", ">u4", "<i8", "<u8", "<f2", "<f4", ">f4", "<f8"]
POLICIES = st.one_of(
    st.sampled_from(["drop", "mean", "drop:7", "drop:-3", "drop:nan"]),
    st.integers(1, 16).map(lambda n: f"quantize:{n}"),
)
CODECS = ["auto", "none", "scaleoffset", "gzip", "lzf", "zstd", "bitshuffle"]


# ------------------------------------------------------------------------------------ helpers


def reference_keep(mask: np.ndarray, low_value_class: int, margin_px: int) -> np.ndarray:
    high = mask != low_value_class
    if margin_px <= 0:
        return high
    return ndimage.maximum_filter(high, size=2 * margin_px + 1, mode="constant", cval=False)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def reference_mean(pixels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean of every maximal run of low pixels inside a row, the slow and obvious way."""
    out = np.full(pixels.shape, np.nan)
    values = pixels.astype(np.float64)
    for r in range(pixels.shape[0]):
        c = 0
        while c < pixels.shape[1]:
            if keep[r, c]:
                c += 1
                continue
            end = c
            while end < pixels.shape[1] and not keep[r, end]:
                end += 1
            out[r, c:end] = values[r, c:end].mean()
            c = end
    return out


def check_low_pixels(pixels, mask_keep, out, reduced) -> None:
    low = ~mask_keep
    if not low.any():
        return
    dtype = pixels.dtype
    got = out[low]
    policy = reduced.policy
    if policy.kind == "drop":
        fill = reduced.low_attrs["fill"]
        if dtype.kind == "f" and math.isnan(float(fill)):
            assert np.isnan(got).all()
        else:
            assert (got == fill).all()
            if dtype.kind in "iu" and math.isfinite(policy.fill):
                info = np.iinfo(dtype)
                assert int(fill) == min(max(round(policy.fill), int(info.min)), int(info.max))
    elif policy.kind == "mean":
        expected = reference_mean(pixels, mask_keep)[low]
        if dtype.kind in "iu" and dtype.itemsize < 8:
            expected = np.rint(expected)
            assert np.array_equal(got.astype(np.float64), expected)
        elif dtype.kind in "iu":  # 64-bit sums go through float64: close, not exact
            assert np.allclose(got.astype(np.float64), np.rint(expected), rtol=1e-9, atol=1)
        else:
            finite = np.isfinite(expected)
            tol = 1e-3 if dtype.itemsize == 2 else 1e-6
            # subnormal means may be flushed to zero (torch/ONNX Runtime set FTZ in the process)
            subnormal = float(np.finfo(dtype).tiny)
            assert np.allclose(got.astype(np.float64)[finite], expected[finite], rtol=tol, atol=subnormal)
    else:
        a = reduced.low_attrs
        if dtype.kind in "iu":
            src = [int(v) for v in pixels[low]]
            dst = [int(v) for v in got]
            shift = int(a["shift"])
            bound = (1 << (shift - 1)) if shift else 0
            assert max(abs(s - d) for s, d in zip(src, dst, strict=True)) <= bound
            assert min(dst) >= min(src) and max(dst) <= max(src)
            if shift == 0:
                assert src == dst  # the range fitted in N bits: nothing was lost
        else:
            src = pixels[low].astype(np.float64)
            dst = got.astype(np.float64)
            assert np.isfinite(dst).all()
            finite = np.isfinite(src)
            step = float(a["step"])
            slack = np.spacing(np.abs(src[finite]).astype(dtype)).astype(np.float64) * 2
            assert (np.abs(dst[finite] - src[finite]) <= step / 2 * (1 + 1e-6) + slack + 1e-300).all()


@st.composite
def frames_and_masks(draw, max_side: int = 24):
    rows = draw(st.integers(1, max_side))
    cols = draw(st.integers(1, max_side))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    pixels = draw(hnp.arrays(dtype, (rows, cols)))
    kind = draw(st.sampled_from(["random", "background", "particle", "checker", "sparse", "blob"]))
    low_value_class = draw(st.sampled_from([0, 1]))
    high = 1 - low_value_class
    if kind == "random":
        mask = draw(hnp.arrays(np.uint8, (rows, cols), elements=st.integers(0, 2)))
    elif kind == "background":
        mask = np.full((rows, cols), low_value_class, np.uint8)
    elif kind == "particle":
        mask = np.full((rows, cols), high, np.uint8)
    elif kind == "checker":  # one-pixel runs everywhere
        mask = np.where((np.add.outer(np.arange(rows), np.arange(cols)) % 2) == 0, high, low_value_class)
        mask = mask.astype(np.uint8)
    elif kind == "sparse":
        mask = np.full((rows, cols), low_value_class, np.uint8)
        r, c = draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))
        mask[r, c] = high
    else:
        mask = np.full((rows, cols), low_value_class, np.uint8)
        r0, c0 = draw(st.integers(0, rows - 1)), draw(st.integers(0, cols - 1))
        mask[r0 : r0 + draw(st.integers(1, rows)), c0 : c0 + draw(st.integers(1, cols))] = high
    return pixels, mask, low_value_class


def make_analysis(mask, *, confidence=0.97, pixel_size_nm=0.05, profile="nanoparticles", warnings=()):
    region = Region(
        region_id=1,
        bbox=(2, 3, 10, 12),
        centroid_px=(6.0, 7.5),
        centroid_nm=(0.3, 0.375) if pixel_size_nm else None,
        area_px=50,
        area_nm2=0.125 if pixel_size_nm else None,
        equivalent_diameter_nm=0.4 if pixel_size_nm else None,
        eccentricity=0.3,
        solidity=0.95,
        touches_edge=False,
        agglomerate_suspect=False,
        features={"fft_peak": 1.5, "contrast": 0.2},
        label="stacking_fault",
        probabilities={"stacking_fault": 0.8, "no_stacking_fault": 0.2},
    )
    return Analysis(
        frame_id="x",
        mask=mask,
        regions=(region,),
        timings_s={"segment": 0.01},
        model_ids={"unet": "np-unet@1.0"},
        profile=profile,
        pixel_size_nm=pixel_size_nm,
        mean_confidence=confidence,
        warnings=tuple(warnings),
    )


def disc_mask(shape, centre, radius) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) <= radius**2).astype(np.uint8)


def noisy_frame(shape, seed=0, dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(1000, 30, shape).astype(dtype)


# ------------------------------------------------------------------------- property: arrays


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames_and_masks(), POLICIES, st.integers(0, 4), st.sampled_from(CODECS))
def test_high_value_pixels_survive_encode_decode_bit_exact(case, policy, margin_px, codec):
    pixels, mask, low_value_class = case
    reduced = reduce_frame(pixels, mask, low_value_class=low_value_class, policy=policy, margin_px=margin_px)
    frame = Frame("prop", pixels)
    back = decode_frame_file(encode_frame_file(reduced, frame, codec=codec)).reduced
    out = restore_pixels(back)

    assert out.dtype == pixels.dtype and out.shape == pixels.shape
    keep = runs_to_bool(back.exact_runs, pixels.size).reshape(pixels.shape)
    assert np.array_equal(keep, reference_keep(mask, low_value_class, margin_px))
    high = mask != low_value_class
    assert same_bits(out[high], pixels[high])
    assert same_bits(out[keep], pixels[keep])
    assert np.array_equal(restore_mask(back), mask)
    check_low_pixels(pixels, keep, out, back)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(DTYPES),
    st.integers(4096, 6000),
    st.sampled_from(CODECS),
    st.data(),
)
def test_every_codec_is_lossless_on_full_range_data(dtype, size, codec, data):
    # Arrays shorter than 4096 are stored unfiltered; these are long enough to go through the codec.
    dtype = np.dtype(dtype)
    pixels = data.draw(hnp.arrays(dtype, (2, size // 2), elements=hnp.from_dtype(dtype)))
    if data.draw(st.booleans()) and dtype.kind in "iu":
        info = np.iinfo(dtype)
        pixels.flat[:2] = [info.min, info.max]  # the widest range scale-offset can meet
    reduced = reduce_frame(pixels, None, lossless=True)
    back = decode_frame_file(encode_frame_file(reduced, Frame("c", pixels), codec=codec)).reduced
    assert same_bits(restore_pixels(back), pixels)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, max_side=150)), st.integers(0, 140))
def test_square_dilation_matches_scipy(a, radius):
    expected = ndimage.maximum_filter(a, size=2 * radius + 1, mode="constant", cval=False) if radius else a
    assert np.array_equal(dilate_square(a, radius), expected)


@given(hnp.arrays(bool, st.integers(1, 300)))
def test_run_lengths_roundtrip(a):
    runs = run_lengths(a)
    assert runs.sum() == a.size
    assert (runs[1:] > 0).all()  # only the first run may be empty
    assert np.array_equal(runs_to_bool(runs, a.size), a)


# ------------------------------------------------------------------------ explicit edge cases


@pytest.mark.parametrize("policy", ["drop", "mean", "quantize:1", "quantize:4", "quantize:16"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (17, 1), (7, 13), (64, 65)])
@pytest.mark.parametrize("kind", ["background", "particle", "checker"])
def test_edge_cases(policy, shape, kind):
    pixels = noisy_frame(shape, seed=sum(shape))
    mask = {
        "background": np.zeros(shape, np.uint8),
        "particle": np.ones(shape, np.uint8),
        "checker": (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 2).astype(np.uint8),
    }[kind]
    reduced = reduce_frame(pixels, mask, policy=policy, margin_px=0)
    out = restore_pixels(decode_frame_file(encode_frame_file(reduced, Frame("e", pixels))).reduced)
    high = mask == 1
    assert np.array_equal(out[high], pixels[high])
    if kind == "particle":
        assert reduced.exact_everywhere and np.array_equal(out, pixels)
    if kind == "background":
        assert reduced.n_exact == 0
    check_low_pixels(pixels, high, out, reduced)


def test_all_background_mean_keeps_row_levels():
    # Runs split at row ends, so a gradient across rows survives the mean policy.
    pixels = (np.arange(32)[:, None] * 10 + np.zeros((32, 40))).astype(np.uint16)
    out = restore_pixels(reduce_frame(pixels, np.zeros(pixels.shape, np.uint8), policy="mean"))
    assert np.array_equal(out, pixels)


def test_quantize_is_exact_when_the_range_fits_the_bits():
    pixels = (np.arange(100).reshape(10, 10) % 16 + 500).astype(np.int16)
    reduced = reduce_frame(pixels, np.zeros((10, 10), np.uint8), policy="quantize:4")
    assert reduced.low_attrs["shift"] == 0
    assert np.array_equal(restore_pixels(reduced), pixels)


@pytest.mark.parametrize("encoding", ["rle", "dense"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 9, 16])
def test_quantize_encodings_agree(encoding, bits):
    pixels, mask = synthetic_frame(96, 0.2, pixel_size_nm=0.05, seed=bits)
    ref = restore_pixels(reduce_frame(pixels, mask, policy=f"quantize:{bits}", quantize_encoding="rle"))
    reduced = reduce_frame(pixels, mask, policy=f"quantize:{bits}", quantize_encoding=encoding)
    assert reduced.low_attrs["encoding"] == encoding
    back = decode_frame_file(encode_frame_file(reduced, Frame("q", pixels))).reduced
    assert np.array_equal(restore_pixels(back), ref)


def test_quantize_auto_picks_rle_for_flat_background_and_dense_for_noise():
    flat = np.full((64, 64), 100, np.int16)
    noisy = noisy_frame((64, 64))
    empty = np.zeros((64, 64), np.uint8)
    assert reduce_frame(flat, empty, policy="quantize:4").low_attrs["encoding"] == "rle"
    assert reduce_frame(noisy, empty, policy="quantize:4").low_attrs["encoding"] == "dense"


def test_non_numeric_frames_are_kept_lossless():
    pixels = (np.arange(12) + 1j * np.arange(12)).astype(np.complex64).reshape(3, 4)
    reduced = reduce_frame(pixels, np.zeros((3, 4), np.uint8))
    assert reduced.lossless and "not reducible" in reduced.lossless_reason
    assert same_bits(restore_pixels(reduced), pixels)


def test_reduce_frame_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        reduce_frame(np.zeros((2, 2, 2)), None, lossless=True)
    with pytest.raises(ValueError, match="does not match"):
        reduce_frame(np.zeros((2, 2)), np.zeros((3, 2), np.uint8))
    with pytest.raises(ValueError, match="lossless"):
        reduce_frame(np.zeros((2, 2)), None)


def test_policy_and_margin_parsing():
    assert str(Policy.parse("drop")) == "drop"
    assert Policy.parse("drop:12").fill == 12
    assert Policy.parse(" Quantize:8 ").bits == 8
    assert str(Policy.parse("mean")) == "mean"
    for bad in ("quantize", "quantize:0", "quantize:17", "median", "mean:3", "drop:x"):
        with pytest.raises(ValueError):
            Policy.parse(bad)
    assert margin_to_pixels(0.5, 0.02) == (25, "nm")
    assert margin_to_pixels(0.51, 0.02) == (26, "nm")  # rounded up: never short of the margin
    assert margin_to_pixels(2.2, None) == (3, "px")
    assert margin_to_pixels(0, 0.1) == (0, "nm")
    with pytest.raises(ValueError):
        margin_to_pixels(-1, 0.1)
    assert Codec.parse("zstd:3") == Codec("zstd", 3)
    with pytest.raises(ValueError):
        Codec.parse("brotli")


def test_drop_fill_is_clipped_into_integer_range():
    pixels = np.full((4, 4), 7, np.uint8)
    reduced = reduce_frame(pixels, np.zeros((4, 4), np.uint8), policy="drop:-5")
    assert (restore_pixels(reduced) == 0).all()
    reduced = reduce_frame(pixels.astype(np.float32), np.zeros((4, 4), np.uint8), policy="drop:nan")
    assert np.isnan(restore_pixels(reduced)).all()


# ----------------------------------------------------------------------------- writer/reader


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
def test_docs_snippet_reads_the_layout_with_plain_h5py(tmp_path, monkeypatch, policy):
    pixels, mask = synthetic_frame(128, 0.2, pixel_size_nm=0.05, seed=1)
    with ArchiveWriter(tmp_path, "session-1", policy=policy, margin_nm=0.1, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=0.05, meta={"mdoc": {"TiltAngle": 0}}), make_analysis(mask))
    monkeypatch.chdir(tmp_path / "session-1")  # the snippet opens session-1-0001.h5
    namespace: dict = {}
    exec(compile(docs_snippet(), "docs-snippet", "exec"), namespace)  # noqa: S102 - our own docs
    expected = ArchiveReader(tmp_path).read("f").pixels()
    assert same_bits(namespace["frame"], expected)
    assert namespace["meta"] == {"mdoc": {"TiltAngle": 0}}
    assert namespace["regions"]["label"][0] == b"stacking_fault"


# ---------------------------------------------------------------------------------- commands


def _main(argv):
    from latticewatch.cli import main

    return main(argv)


def _write_mrc(path: Path, data: np.ndarray, voxel_a: float) -> None:
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_a


@pytest.mark.parametrize("reduce", [True, False])
def test_restore_command_round_trips_a_real_mrc(tmp_path, reduce):
    from latticewatch.io.readers import read_frames

    source = tmp_path / "source.mrc"
    pixels = noisy_frame((97, 130), seed=7)  # odd sizes on purpose
    _write_mrc(source, pixels, voxel_a=0.5)
    before = source.read_bytes()
    (frame,) = list(read_frames(source))
    assert frame.pixel_size_nm == pytest.approx(0.05)
    mask = disc_mask(pixels.shape, (50, 60), 15)
    with ArchiveWriter(tmp_path / "archive", "session-1", policy="drop", margin_nm=0.25,
                       reduce=reduce, fsync=False) as writer:
        writer.write(frame, make_analysis(mask))

    out = tmp_path / "restored.mrc"
    assert _main(["restore", str(tmp_path / "archive"), "--frame", frame.frame_id, "--out", str(out),
                  "--mask", str(tmp_path / "mask.tif")]) == 0
    with mrcfile.open(out) as mrc:
        restored = mrc.data.copy()
        assert float(mrc.voxel_size.x) == pytest.approx(0.5)
    assert restored.dtype == pixels.dtype and restored.shape == pixels.shape
    keep = reference_keep(mask, 0, 5)
    if reduce:
        assert np.array_equal(restored[keep], pixels[keep])
        assert (restored[~keep] == 0).all()
    else:
        assert np.array_equal(restored, pixels)
    assert np.array_equal(tifffile.imread(tmp_path / "mask.tif"), mask)
    assert source.read_bytes() == before  # the source is never touched
    # and the restored file reads back through the project's own reader
    (again,) = list(read_frames(out))
    assert np.array_equal(again.pixels, restored) and again.pixel_size_nm == pytest.approx(0.05)


def test_restore_command_writes_a_tiff_stack_and_reports_errors(tmp_path, capsys):
    frames = [Frame(f"f{i}", noisy_frame((20, 24), seed=i, dtype=np.int32), pixel_size_nm=0.1) for i in range(3)]
    with ArchiveWriter(tmp_path, "s", reduce=False, fsync=False) as writer:
        for f in frames:
            writer.write(f, None)
        writer.write(Frame("other", noisy_frame((8, 8))), None)
    out = tmp_path / "stack.tif"
    argv = ["restore", str(tmp_path), "--out", str(out)]
    assert _main([*argv[:2], "--frame", "f0", "--frame", "f1", "--frame", "f2", *argv[2:]]) == 0
    stack = tifffile.imread(out)
    assert stack.shape == (3, 20, 24) and np.array_equal(stack[2], frames[2].pixels)
    assert _main([*argv, "--frame", "f0"]) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert _main(argv) == 2  # shapes differ
    assert _main(["restore", str(tmp_path), "--frame", "nope", "--out", str(out)]) == 2
    assert _main(["restore", str(tmp_path), "--frame", "f0", "--out", str(tmp_path / "x.mrc")]) == 2  # int32
    assert ".tif" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp-*"))


def test_archive_stats_command(tmp_path, capsys):
    pixels, mask = synthetic_frame(256, 0.05, pixel_size_nm=0.05)
    with ArchiveWriter(tmp_path, "s", margin_nm=0.1, fsync=False) as writer:
        writer.write(Frame("f", pixels, pixel_size_nm=0.05), make_analysis(mask))
    assert _main(["archive-stats", str(tmp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["frames"] == 1 and stats["ratio"] > 1
    assert _main(["archive-stats", str(tmp_path), "--frames"]) == 0
    text = capsys.readouterr().out
    assert "ratio" in text and "exact_pixels" in text and frame_key("f") in text
    assert _main(["archive-stats", str(tmp_path / "missing")]) == 2


def test_help_texts_say_what_is_lossy(capsys):
    with pytest.raises(SystemExit):
        _main(["restore", "--help"])
    assert "bit-exact" in capsys.readouterr().out


def test_bench_smoke():
    result = run_archive_bench(192, coverages=(0.15,), policies=("drop", "mean", "quantize:4", "lossless"), repeats=1)
    rows = {r["policy"]: r for r in result["results"]}
    assert set(rows) == {"drop", "mean", "quantize:4", "lossless"}
    assert rows["lossless"]["low_max_abs_error"] == 0 and rows["lossless"]["exact_fraction"] == 1
    assert rows["drop"]["ratio"] > rows["lossless"]["ratio"]
    assert {"encode_MBps", "decode_MBps", "ratio"} <= set(rows["drop"])
    assert result["goals"]["ratio_drop_15pct"] == rows["drop"]["ratio"]
    json.dumps(result)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32])
def test_split_encoding_round_trips_and_packs_to_minimum_bits(dtype):
    from latticewatch.sinks.archive.bitpack import join_bytes, split_bytes

    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    for span in (1, 200, 400, 3000, 60000):
        lo = max(int(info.min), min(int(info.max) - span, 17))
        values = rng.integers(lo, min(int(info.max), lo + span) + 1, 5001).astype(dtype)
        encoded = split_bytes(values)
        if int(values.max()) - int(values.min()) >= 1 << 16:
            assert encoded is None
            continue
        low, high, attrs = encoded
        bits = (int(values.max()) - int(values.min())).bit_length()
        assert attrs["bits"] == bits and low.size == values.size
        stored = low.nbytes + (0 if high is None else high.nbytes)
        assert stored <= values.size * (8 + attrs.get("high_container", 0)) / 8 + 1
        np.testing.assert_array_equal(join_bytes(low, high, attrs, np.dtype(dtype)), values)


def test_split_encoding_declines_floats_and_64_bit():
    from latticewatch.sinks.archive.bitpack import split_bytes

    assert split_bytes(np.arange(10, dtype=np.float32)) is None
    assert split_bytes(np.arange(10, dtype=np.int64)) is None
