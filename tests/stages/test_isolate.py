import numpy as np
import pytest
from scipy import ndimage

from latticewatch.stages.isolate import IsolationParams, _clean_components, clean_labels, measure


def regions_of(mask):
    """The measured regions of a binary mask, labelled as the analyser labels them."""
    return measure(ndimage.label(mask)[0])


def disc(shape, centre, radius):
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_clean_labels_removes_speckle_and_small_regions_keeps_particles():
    prob = np.zeros((200, 200), np.float32)
    prob[disc(prob.shape, (60, 60), 30)] = 0.9
    prob[150, 150] = 1.0  # single-pixel speckle
    prob[disc(prob.shape, (150, 40), 3)] = 0.8  # 28 px at 0.05 nm/px = 0.07 nm² < 2 nm²
    regions = measure(clean_labels(prob, IsolationParams(), 0.05))
    assert len(regions) == 1
    assert regions[0].area_px == pytest.approx(np.pi * 30**2, rel=0.05)


def test_threshold_from_params():
    prob = np.zeros((100, 100), np.float32)
    prob[disc(prob.shape, (50, 50), 20)] = 0.6
    assert clean_labels(prob, IsolationParams(threshold=0.5), 0.05).any()
    assert not clean_labels(prob, IsolationParams(threshold=0.7), 0.05).any()


def test_closing_fills_gaps_between_fringes_and_holes():
    prob = np.zeros((100, 100), np.float32)
    inside = disc(prob.shape, (50, 50), 30)
    prob[inside] = 1.0
    prob[::4, :] = 0  # dark fringes cut the particle into stripes
    regions = measure(clean_labels(prob, IsolationParams(opening_radius_nm=0), 0.05))
    assert len(regions) == 1 and regions[0].solidity > 0.95


def test_region_properties_and_edge_flag():
    mask = np.zeros((64, 64), bool)
    mask[0:10, 20:40] = True  # touches the top edge
    mask[30:40, 30:35] = True
    regions = regions_of(mask)
    by_area = sorted(regions, key=lambda r: r.area_px)
    small, big = by_area
    assert small.area_px == 50 and small.bbox == (30, 30, 40, 35) and not small.touches_edge
    assert big.touches_edge and big.eccentricity > 0.8 and big.solidity == pytest.approx(1.0)
    assert small.centroid == pytest.approx((34.5, 32.0))


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_disk_morphology_equals_scipy(radius):
    from scipy import ndimage
    from skimage.morphology import disk

    from latticewatch.stages.isolate import disk_morphology

    rng = np.random.default_rng(radius)
    mask = ndimage.gaussian_filter(rng.random((90, 70)), 2) > 0.5
    structure = disk(radius).astype(bool)
    np.testing.assert_array_equal(disk_morphology(mask, radius, erode=True), ndimage.binary_erosion(mask, structure))
    np.testing.assert_array_equal(disk_morphology(mask, radius, erode=False), ndimage.binary_dilation(mask, structure))


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from latticewatch.stages.isolate import fill_holes

    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((120, 100)), 3) > 0.48
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_solidity_of_known_shapes():
    from latticewatch.stages.isolate import solidity

    square = np.ones((10, 10), bool)
    assert solidity(square) == pytest.approx(1.0)
    ell = np.zeros((10, 10), bool)
    ell[:, :3] = True
    ell[7:, :] = True  # an L: 30 + 21 = 51 px; hull of the corners covers 10·10 − ½·7·7 = 75.5
    assert solidity(ell) == pytest.approx(51 / 75.5)
    two_touching_discs = disc((60, 100), (30, 30), 20) | disc((60, 100), (30, 68), 20)
    assert solidity(two_touching_discs) < 0.9 < solidity(disc((60, 60), (30, 30), 20))


def _reference_regions(mask):
    """The plain implementation the fast `isolate` replaced: skimage's regionprops, and the hull of the
    corners of every boundary pixel for the solidity."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull
    from skimage.measure import regionprops

    out = []
    for props in regionprops(ndimage.label(mask)[0]):
        region = props.image
        ys, xs = np.nonzero(region & ~ndimage.binary_erosion(region))
        corners = np.concatenate([np.column_stack([ys + dy, xs + dx]) for dy in (0, 1) for dx in (0, 1)])
        out.append((props.label, props.bbox, props.centroid, props.area, props.eccentricity,
                    props.area / ConvexHull(corners).volume))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measure_measures_like_regionprops(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((160, 140)), 3) > 0.5  # irregular, concave, on the border
    mask[70:73, 20] = True  # a line: eccentricity 1
    mask[100, 100] = True  # a single pixel: eccentricity 0
    regions = regions_of(mask)
    reference = _reference_regions(mask)
    assert len(regions) == len(reference) > 10
    for r, (label, bbox, centroid, area, eccentricity, solidity) in zip(regions, reference):
        assert (r.label, r.bbox, r.centroid, r.area_px) == (label, bbox, centroid, area)
        assert r.eccentricity == pytest.approx(eccentricity, rel=1e-9, abs=1e-12)
        assert r.solidity == pytest.approx(solidity, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_labels_are_the_labels_of_the_clean_mask(seed):
    rng = np.random.default_rng(seed)
    prob = ndimage.gaussian_filter(rng.random((200, 180)), 2.5).astype(np.float32)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    params = IsolationParams(min_area_nm2=0.5)  # drops some components, keeps others
    labels = clean_labels(prob, params, 0.05)
    components, keep = _clean_components(prob, params, 0.05)
    reference, n = ndimage.label(keep[components])  # the clean mask, labelled a second time
    assert n > 3 and labels.dtype == reference.dtype
    np.testing.assert_array_equal(labels, reference)
    assert ndimage.label(prob >= params.threshold)[1] > n  # small components were dropped


def _mask_without_holes(case):
    mask = np.zeros((40, 50), bool)
    if case == "no holes":
        mask[10:20, 10:30] = True
    elif case == "foreground on the border":
        mask[0:15, 0:50] = True
        mask[30:40, 20:25] = True
    elif case == "all foreground":
        mask[:] = True
    return mask


@pytest.mark.parametrize("case", ["no holes", "foreground on the border", "all foreground", "all background"])
def test_fill_holes_without_holes_equals_scipy(case):
    from scipy import ndimage

    from latticewatch.stages.isolate import fill_holes

    mask = _mask_without_holes(case)
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
