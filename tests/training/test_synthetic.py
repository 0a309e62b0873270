"""The analytic HRTEM generator: shapes, ground truth and the physics the models rely on."""

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import regionprops

from latticewatch.frame import CLASSES
from latticewatch.testing.synthetic.crystals import MIN_FRINGE_PERIOD_PX
from latticewatch.testing.synthetic.frames import (
    PARTICLE_CLASSES,
    generate_frame,
    generate_region,
    usable_spacing_range_nm,
)
from latticewatch.testing.synthetic.truth import SyntheticImage


def _wrap(angle):
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def _crop(image, instances, instance):
    rows, cols = np.nonzero(instances == instance)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return image[box].astype(float), instances[box] == instance


def _spectral_peaks(pixels, inside, pixel_size_nm):
    """Strongest lattice peak of a particle crop and the strongest one in another direction.

    Returns ``(k1, p1, k2, p2, n)``: wave vectors in cycles/pixel, their FFT magnitudes and the
    crop's longer side (one FFT bin is ``1/n``).
    """
    x = (pixels - pixels[inside].mean()) * inside
    spectrum = np.abs(np.fft.fft2(x))
    kr = np.fft.fftfreq(x.shape[0])[:, None]
    kc = np.fft.fftfreq(x.shape[1])[None, :]
    # Below the coarsest lattice frequency there is only the particle's outline.
    spectrum[np.hypot(kr, kc) < 0.6 * pixel_size_nm / 0.35] = 0
    i = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    k1 = np.array([kr[i[0], 0], kc[0, i[1]]])
    p1 = spectrum[i]
    grid = np.stack(np.broadcast_arrays(kr, kc))
    for sign in (1, -1):  # blank the peak, its Friedel mate and their side lobes (periodic grid)
        offset = ((grid - sign * k1[:, None, None]) + 0.5) % 1.0 - 0.5
        spectrum[np.hypot(*offset) < 0.35 * np.hypot(*k1)] = 0
    j = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    k2 = np.array([kr[j[0], 0], kc[0, j[1]]])
    return k1, p1, k2, spectrum[j], max(x.shape)


def _side_phases(img: SyntheticImage, particle, normal, point, margin_px):
    """Least-squares phases of both fringe sets on each side of a plane through the particle.

    Both sets and their cross terms are fitted together, so the sets do not leak into each other.
    Returns two arrays (minus side, plus side) with the phase of set 0 and set 1.
    """
    inner = ndimage.distance_transform_edt(img.instances == particle.instance) > margin_px
    rows, cols = np.nonzero(inner)
    values = img.image[rows, cols].astype(float)
    waves = []
    for angle, spacing in zip(particle.fringe_angles_deg, particle.fringe_spacings_nm):
        theta = np.radians(angle)
        waves.append(np.array([np.sin(theta), np.cos(theta)]) * img.pixel_size_nm / spacing)
    waves += [waves[0] + waves[1], waves[0] - waves[1]]
    args = [2 * np.pi * (g[0] * rows + g[1] * cols) for g in waves]
    design = np.stack([np.ones_like(values)] + [f(a) for a in args for f in (np.cos, np.sin)], 1)
    side = (rows - point[0]) * normal[0] + (cols - point[1]) * normal[1]
    half_period = 0.5 * particle.fringe_spacings_nm[0] / img.pixel_size_nm
    phases = []
    for selected in (side < -half_period, side > half_period):
        coef, *_ = np.linalg.lstsq(design[selected], values[selected], rcond=None)
        phases.append(np.array([np.arctan2(-coef[2 + 2 * k], coef[1 + 2 * k]) for k in range(2)]))
    return phases


# ------------------------------------------------------------------------------------------------
# Structure of the output


def test_same_seed_same_frame_and_different_seed_different_frame():
    a = generate_frame(np.random.default_rng(7), shape=(256, 256))
    b = generate_frame(np.random.default_rng(7), shape=(256, 256))
    c = generate_frame(np.random.default_rng(8), shape=(256, 256))
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.instances, b.instances)
    assert a.particles == b.particles
    assert a.params == b.params
    assert not np.array_equal(a.image, c.image)
    r1 = generate_region(np.random.default_rng(3), "agglomeration")
    r2 = generate_region(np.random.default_rng(3), "agglomeration")
    assert np.array_equal(r1.image, r2.image) and r1.particles == r2.particles


def test_types_shapes_and_mask_matches_instances():
    img = generate_frame(np.random.default_rng(1), shape=(200, 320), n_particles=3)
    assert img.image.dtype == np.uint16 and img.image.shape == (200, 320)
    assert img.mask.dtype == np.uint8 and img.instances.dtype == np.int32
    assert img.expected.dtype == np.float32 and img.expected.shape == (200, 320)
    assert np.array_equal(img.mask, (img.instances > 0).astype(np.uint8))
    assert len(img.particles) == 3 == img.params["n_placed"]
    assert sorted(np.unique(img.instances[img.instances > 0])) == [1, 2, 3]
    assert [p.instance for p in img.particles] == [1, 2, 3]
    json.dumps(img.params)
    for p in img.particles:
        json.dumps(dataclasses.asdict(p))
        assert p.label in PARTICLE_CLASSES
        assert len(p.fringe_spacings_nm) == len(p.fringe_angles_deg) >= 1
        inst = img.instances
        borders = (inst[0], inst[-1], inst[:, 0], inst[:, -1])
        on_border = any((border == p.instance).any() for border in borders)
        assert p.touches_edge == on_border


def test_particles_do_not_touch_each_other_and_coverage_is_sensible():
    coverages, edge_cut = [], 0
    for seed in range(6):
        img = generate_frame(np.random.default_rng(seed))
        inst = img.instances
        right, down, diagonal = (
            (inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:]), (inst[:-1, :-1], inst[1:, 1:])
        )
        for a, b in (right, down, diagonal):
            assert not ((a > 0) & (b > 0) & (a != b)).any()
        coverages.append(img.params["coverage"])
        edge_cut += sum(p.touches_edge for p in img.particles)
        for p in img.particles:  # every instance is one connected piece, even when cut by the edge
            assert ndimage.label(inst == p.instance)[1] == 1
    assert 0.03 < np.mean(coverages) < 0.35
    assert edge_cut > 0  # particles do reach the frame edge sometimes


def test_labels_follow_class_weights_and_regions():
    img = generate_frame(np.random.default_rng(2), n_particles=4, class_weights={"misoriented": 1})
    assert [p.label for p in img.particles] == ["misoriented"] * 4
    assert all(p.fault is None and len(p.fringe_spacings_nm) == 1 for p in img.particles)
    img = generate_frame(
        np.random.default_rng(2), n_particles=3, class_weights={"stacking_fault": 1}
    )
    assert all(p.label == "stacking_fault" and p.fault is not None for p in img.particles)
    for label in CLASSES:
        region = generate_region(np.random.default_rng(5), label, size_px=128)
        assert region.image.shape == (128, 128) and region.image.dtype == np.uint16
        if label == "empty":
            assert region.particles == () and not region.instances.any() and region.mask.any()
        else:
            (p,) = region.particles
            assert p.label == label and p.instance == 1
            assert np.array_equal(region.mask, (region.instances == 1).astype(np.uint8))
            assert not p.touches_edge  # the crop holds the whole region
            assert np.hypot(*(np.array(p.centre_px) - 63.5)) < 2.0


def test_bad_arguments_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="empty"):
        generate_frame(rng, class_weights={"empty": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        generate_frame(rng, class_weights={"twinned": 1.0})
    with pytest.raises(ValueError, match="label"):
        generate_region(rng, "twinned")
    with pytest.raises(ValueError, match="too coarse"):
        generate_frame(rng, pixel_size_nm=0.2)
    with pytest.raises(ValueError, match="dose_range"):
        generate_frame(rng, dose_range=(0.0, 10.0))


# ------------------------------------------------------------------------------------------------
# Geometry in physical units


@pytest.mark.parametrize("pixel_size_nm", [0.02, 0.05, 0.1])
def test_diameters_in_nm_match_the_mask_area(pixel_size_nm):
    checked = 0
    for seed in range(6):
        img = generate_frame(np.random.default_rng(seed), pixel_size_nm=pixel_size_nm)
        cap = 0.6 * 512 * pixel_size_nm
        for p in img.particles:
            area_px = np.count_nonzero(img.instances == p.instance)
            if p.label != "agglomeration":
                assert 2.0 - 1e-9 <= p.diameter_nm <= min(10.0, cap) + 1e-9
            if not p.touches_edge:
                measured = np.sqrt(4 * area_px / np.pi) * pixel_size_nm
                assert measured == pytest.approx(p.diameter_nm, rel=0.02, abs=pixel_size_nm)
                checked += 1
    assert checked >= 3


def test_agglomerates_are_single_instances_of_touching_lobes():
    for seed in range(10):
        crop = generate_region(np.random.default_rng(seed), "agglomeration", size_px=200)
        (p,) = crop.particles
        region = crop.instances == 1
        members = p.detail["members"]
        assert 2 <= len(members) <= 3
        assert ndimage.label(region)[1] == 1  # one connected instance
        for m in members:  # each member's centre lies in the union ...
            r, c = np.round(m["centre_px"]).astype(int)
            assert region[r, c]
        # ... and the members are distinct lobes, not one particle swallowing another.
        centres = np.array([m["centre_px"] for m in members])
        spread = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        smallest_radius_px = min(m["diameter_nm"] for m in members) / 2 / crop.pixel_size_nm
        assert spread[np.triu_indices(len(members), 1)].min() > 0.5 * smallest_radius_px
        # A union of overlapping convex lobes has a waist; a convex single particle has none.
        assert regionprops(region.astype(np.uint8))[0].solidity < 0.95
        single = generate_region(np.random.default_rng(seed), "no_stacking_fault", size_px=200)
        assert regionprops(single.instances)[0].solidity > 0.955


# ------------------------------------------------------------------------------------------------
# The lattice


@pytest.mark.parametrize("pixel_size_nm", [0.025, 0.05, 0.1])
@pytest.mark.parametrize("label", ["no_stacking_fault", "misoriented", "stacking_fault"])
def test_fft_peak_of_a_particle_is_at_its_lattice_spacing(label, pixel_size_nm):
    for seed in range(4):
        region = generate_region(
            np.random.default_rng(seed), label, size_px=160, pixel_size_nm=pixel_size_nm,
            dose_range=(200.0, 200.0),
        )
        (p,) = region.particles
        if p.detail.get("variant") == "weak":
            continue  # a very weak lattice may lose to the carbon; that is its point
        k1, _, _, _, n = _spectral_peaks(*_crop(region.image, region.instances, 1), pixel_size_nm)
        true_k = np.array([pixel_size_nm / d for d in p.fringe_spacings_nm])
        assert np.min(np.abs(np.hypot(*k1) - true_k)) * n < 1.5  # within a bin or two
        assert min(p.fringe_spacings_nm) / pixel_size_nm >= MIN_FRINGE_PERIOD_PX - 1e-9


def test_fringes_are_found_in_a_frame_particle_crop():
    img = generate_frame(np.random.default_rng(11), n_particles=3, dose_range=(150.0, 150.0))
    for p in img.particles:
        if p.touches_edge or p.detail.get("variant") == "weak":
            continue
        k1, _, _, _, n = _spectral_peaks(*_crop(img.image, img.instances, p.instance), 0.05)
        true_k = np.array([0.05 / d for d in p.fringe_spacings_nm])
        assert np.min(np.abs(np.hypot(*k1) - true_k)) * n < 1.5


def test_misoriented_shows_one_fringe_direction_and_zone_axis_two():
    kw = dict(
        size_px=160, pixel_size_nm=0.05, dose_range=(200.0, 200.0), diameter_range_nm=(4.0, 7.0)
    )
    for seed in range(8):
        zone = generate_region(np.random.default_rng(seed), "no_stacking_fault", **kw)
        (p,) = zone.particles
        k1, p1, k2, p2, n = _spectral_peaks(*_crop(zone.image, zone.instances, 1), 0.05)
        assert p2 / p1 > 0.35
        # The second direction is another reflection of the lattice: set two or g1 ± g2.
        g = [
            np.array([np.sin(np.radians(a)), np.cos(np.radians(a))]) * 0.05 / d
            for a, d in zip(p.fringe_angles_deg, p.fringe_spacings_nm)
        ]
        reflections = [g[0], g[1], g[0] + g[1], g[0] - g[1]]
        assert min(np.hypot(*(k2 - s * r)).min() for r in reflections for s in (1, -1)) * n < 2.0
        tilted = generate_region(np.random.default_rng(100 + seed), "misoriented", **kw)
        (q,) = tilted.particles
        assert len(q.fringe_spacings_nm) == 1 and q.detail["variant"] in ("planes", "weak")
        if q.detail["variant"] == "planes":
            _, p1, _, p2, _ = _spectral_peaks(*_crop(tilted.image, tilted.instances, 1), 0.05)
            assert p2 / p1 < 0.35


@pytest.mark.parametrize("pixel_size_nm,size_px", [(0.05, 224), (0.1, 128), (0.025, 448)])
def test_stacking_fault_shifts_the_crossing_fringes_across_its_plane(pixel_size_nm, size_px):
    kw = dict(
        size_px=size_px, pixel_size_nm=pixel_size_nm, dose_range=(200.0, 200.0),
        diameter_range_nm=(6.0, 9.0),
    )
    for seed in range(3):
        faulted = generate_region(np.random.default_rng(seed), "stacking_fault", **kw)
        (p,) = faulted.particles
        fault = p.fault
        assert fault["shifted_set"] == 1 and fault["plane_set"] == 0
        assert abs(fault["phase_shift_rad"]) == pytest.approx(2 * np.pi / 3)
        # The fault plane is parallel to set 0's lattice planes.
        theta = np.radians(p.fringe_angles_deg[0])
        assert abs(np.dot(fault["normal"], [np.sin(theta), np.cos(theta)])) == pytest.approx(1.0)
        margin = 0.3 / pixel_size_nm
        minus, plus = _side_phases(faulted, p, fault["normal"], fault["point_px"], margin)
        jump = _wrap(plus - minus)
        assert abs(_wrap(jump[1] - fault["phase_shift_rad"])) < 0.35
        assert abs(jump[0]) < 0.35  # planes parallel to the fault are not displaced

        intact = generate_region(np.random.default_rng(seed), "no_stacking_fault", **kw)
        (q,) = intact.particles
        assert q.fault is None
        theta = np.radians(q.fringe_angles_deg[0])
        normal = (np.sin(theta), np.cos(theta))
        minus, plus = _side_phases(intact, q, normal, q.centre_px, margin)
        assert np.abs(_wrap(plus - minus)).max() < 0.35


def test_fringes_stay_below_nyquist_at_coarse_pixels():
    assert usable_spacing_range_nm(0.05) == (0.2, 0.35)
    assert usable_spacing_range_nm(0.1) == (0.25, 0.35)
    img = generate_frame(np.random.default_rng(4), pixel_size_nm=0.1, n_particles=4)
    assert img.params["spacing_range_nm"] == [0.25, 0.35]
    for p in img.particles:
        assert min(p.fringe_spacings_nm) >= 0.25 - 1e-9


# ------------------------------------------------------------------------------------------------
# Intensities


def test_counts_are_poisson_at_the_drawn_dose():
    img = generate_frame(np.random.default_rng(9), n_particles=0, dose_range=(80.0, 80.0))
    assert img.params["dose_per_px"] == 80.0
    counts = img.image.astype(float)
    assert counts.mean() == pytest.approx(80.0, rel=0.02)
    residual = counts - img.expected
    assert abs(residual.mean()) < 0.05
    assert residual.var() == pytest.approx(img.expected.mean(), rel=0.03)  # Var = mean
    # On the raw image of the carbon, the variance is the shot noise plus the carbon texture.
    assert 1.0 < counts.var() / counts.mean() < 2.5


def test_particles_have_weak_amplitude_contrast():
    ratios = []
    for seed in range(4):
        img = generate_frame(np.random.default_rng(seed), dose_range=(200.0, 200.0))
        background = ndimage.binary_erosion(img.instances == 0, iterations=5)
        carbon = img.image[background].mean()
        ratios += [img.image[img.instances == p.instance].mean() / carbon for p in img.particles]
    assert len(ratios) >= 6
    assert np.all(np.abs(np.array(ratios) - 1.0) < 0.04)
