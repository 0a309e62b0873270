"""Archive reduction (`latticewatch.sinks.archive.reduce`, `runs`, `bitpack`): what is kept of each pixel, checked
against plain references on hypothesis-drawn frames and masks and on hand-picked edge cases."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from archive_frames import noisy_frame, reference_keep, same_bits
from latticewatch.frame import Frame
from latticewatch.sinks.archive import Codec, decode_frame_file, encode_frame_file
from latticewatch.sinks.archive.bench import synthetic_frame
from latticewatch.sinks.archive.reduce import Policy, margin_to_pixels, reduce_frame, restore_mask, restore_pixels
from latticewatch.sinks.archive.runs import dilate_square, run_lengths, runs_to_bool

DTYPES = ["i1", "u1", "<i2", ">i2", "<u2", ">u2", "<i4", ">u4", "<i8", "<u8", "<f2", "<f4", ">f4", "<f8"]
POLICIES = st.one_of(
    st.sampled_from(["drop", "mean", "drop:7", "drop:-3", "drop:nan"]),
    st.integers(1, 16).map(lambda n: f"quantize:{n}"),
)
CODECS = ["auto", "none", "scaleoffset", "gzip", "lzf", "zstd", "bitshuffle"]


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
