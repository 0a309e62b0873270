"""Atomic models of the multislice simulator: stacking, planted defects, shapes, orientation, carbon."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

pytest.importorskip("ase")

from latticewatch.training.simulate.structures import carbon, orientation, particles, stacking


def _env(seq) -> str:
    return stacking.stacking_environments(seq)


# --------------------------------------------------------------------------------------------
# Stacking sequences


@pytest.mark.parametrize("structure", ["fcc", "zincblende"])
def test_perfect_cubic_stacking_is_abc(structure):
    for start in range(3):
        for direction in (1, -1):
            seq = stacking.stacking_sequence(structure, 12, start=start, direction=direction)
            assert set(_env(seq)) == {"c"}
            assert np.all(np.diff(seq.astype(int)) % 3 == direction % 3)


def test_perfect_wurtzite_is_ab():
    seq = stacking.stacking_sequence("wurtzite", 10, start=1)
    assert stacking.letters(seq) == "BCBCBCBCBC"
    assert set(_env(seq)) == {"h"}


@pytest.mark.parametrize(
    "structure, kind, pattern",
    [
        ("fcc", "intrinsic", "hh"),  # a missing layer: two adjacent hexagonal layers
        ("fcc", "extrinsic", "hch"),  # an extra layer: two hexagonal layers one apart
        ("fcc", "twin", "h"),  # a mirror: one hexagonal layer, the twin plane
        ("zincblende", "twin", "h"),
        ("wurtzite", "I1", "c"),  # in AB stacking the fault is the cubic layer(s)
        ("wurtzite", "I2", "cc"),
    ],
)
def test_each_defect_breaks_the_stacking_exactly_once(structure, kind, pattern):
    perfect = "h" if structure == "wurtzite" else "c"
    for layer in range(2, 9):
        seq = stacking.stacking_sequence(structure, 14, {layer: kind})
        assert np.all(seq[1:] != seq[:-1]), "neighbouring layers must differ"
        env = _env(seq)
        core = env.strip(perfect)
        assert core == pattern, (layer, stacking.letters(seq), env)
        # the break starts at the given layer: environments are of inner layers 1..n-2
        first_bad = env.index(pattern[0]) + 1
        assert first_bad in (layer - 1, layer)


def test_twin_mirrors_the_sequence():
    seq = stacking.stacking_sequence("fcc", 9, {4: "twin"})
    # layer 3 is the mirror plane: layers 3 ± k coincide
    for k in range(1, 4):
        assert seq[3 - k] == seq[3 + k]


def test_defect_arguments_are_checked():
    with pytest.raises(ValueError, match="I1"):
        stacking.stacking_sequence("fcc", 8, {3: "I1"})
    with pytest.raises(ValueError, match="layer"):
        stacking.stacking_sequence("fcc", 8, {1: "twin"})


# --------------------------------------------------------------------------------------------
# Particles: the atoms hold the planted stacking


CASES = [
    ("Au", "fcc", ()),
    ("Au", "fcc", ("intrinsic",)),
    ("Pd", "fcc", ("extrinsic",)),
    ("Au", "fcc", ("twin",)),
    ("Pd", "fcc", ("twin", "intrinsic")),
    ("CdSe", "zincblende", ()),
    ("CdSe", "zincblende", ("twin",)),
    ("CdSe", "wurtzite", ()),
    ("CdSe", "wurtzite", ("I1",)),
    ("CdSe", "wurtzite", ("I2",)),
]


@pytest.mark.parametrize("material, structure, defects", CASES)
def test_layer_sequence_read_from_atoms_contains_the_planted_defects(material, structure, defects):
    rng = np.random.default_rng(CASES.index((material, structure, defects)))
    for size in (2.5, 4.5):
        p = particles.single_crystal(rng, material, size, structure=structure, defects=defects)
        first = p.lattice.basis[0][0]
        # thermal-size displacements must not change what is read back
        jitter = rng.normal(scale=0.08, size=p.local_positions.shape)
        site_atoms = p.symbols == first  # one atom per layer site
        layers, reg = stacking.layer_registry(p.local_positions[site_atoms] + jitter[site_atoms], p.lattice)
        assert np.all(np.diff(layers) == 1), "no missing layer inside a particle"
        assert stacking.letters(reg) == p.params["stacking"]
        env = _env(reg)
        perfect = "h" if structure == "wurtzite" else "c"
        if not defects:
            assert set(env) == {perfect}, env
            assert p.params["defects"] == []
            continue
        faults = [d for d in p.params["defects"]]
        assert sorted(d["type"].split("_")[0] for d in faults) == sorted(k for k in defects)
        expected = {"intrinsic": 2, "extrinsic": 2, "twin": 1, "I1": 1, "I2": 2}
        odd = "c" if structure == "wurtzite" else "h"
        assert env.count(odd) == sum(expected[k] for k in defects), (stacking.letters(reg), env)
        for d in faults:
            j = d["layer"]
            # the recorded layer is where the sequence first departs from perfect stacking
            assert 2 <= j <= len(reg) - 2
            assert odd in env[max(0, j - 2): j + 1], (j, env)


def test_defects_lie_in_the_middle_half_of_the_particle():
    rng = np.random.default_rng(5)
    for _ in range(10):
        p = particles.single_crystal(rng, "Au", 5.0, defects=("intrinsic",))
        n = len(p.params["stacking"])
        j = p.params["defects"][0]["layer"]
        assert 0.2 * n <= j <= 0.8 * n
        # the plane passes through the particle: within its half-thickness of the centroid
        normal = np.array(p.params["defects"][0]["normal"])
        extent = np.abs(p.positions @ normal).max() / 10
        assert abs(p.params["defects"][0]["offset_nm"]) < extent


def test_on_zone_particles_have_their_faults_edge_on():
    rng = np.random.default_rng(11)
    for material, structure in (("Au", "fcc"), ("CdSe", "wurtzite"), ("CdSe", "zincblende")):
        kind = stacking.DEFECTS[structure][0]
        p = particles.single_crystal(rng, material, 4.0, structure=structure, defects=(kind,))
        normal = np.array(p.params["defects"][0]["normal"])
        assert abs(normal[2]) <= math.sin(math.radians(orientation.ZONE_JITTER_DEG)) + 1e-9
        # the close-packed rows (stacking-frame x) run along the beam: atomic columns
        row = p.rotation @ np.array([1.0, 0.0, 0.0])
        assert abs(row[2]) >= math.cos(math.radians(orientation.ZONE_JITTER_DEG)) - 1e-9
        assert orientation.angle_to_zone(p.rotation, structure) <= orientation.ZONE_JITTER_DEG + 1e-6


def test_misoriented_particles_are_off_every_zone_axis():
    rng = np.random.default_rng(2)
    for material in ("Au", "CdSe"):
        for _ in range(5):
            p = particles.single_crystal(rng, material, 3.0, on_zone=False, min_off_zone_deg=6.0)
            assert p.params["zone_axis"] is None
            assert orientation.angle_to_zone(p.rotation, p.params["structure"]) >= 6.0
            assert p.params["angle_to_nearest_zone_deg"] >= 6.0


def test_bond_lengths_match_ase_bulk():
    from ase.build import bulk

    rng = np.random.default_rng(0)
    for material, structure, ase_kwargs in (
        ("Au", "fcc", {"name": "Au", "crystalstructure": "fcc", "a": 4.078}),
        ("Pd", "fcc", {"name": "Pd", "crystalstructure": "fcc", "a": 3.891}),
        ("CdSe", "zincblende", {"name": "CdSe", "crystalstructure": "zincblende", "a": 6.077}),
        ("CdSe", "wurtzite", {"name": "CdSe", "crystalstructure": "wurtzite", "a": 4.30, "c": 7.01, "u": 0.375}),
    ):
        p = particles.single_crystal(rng, material, 3.0, structure=structure)
        d, _ = cKDTree(p.positions).query(p.positions, k=2)
        ref = bulk(**ase_kwargs).repeat(3)
        dref, _ = cKDTree(ref.positions).query(ref.positions, k=2)
        assert d[:, 1].min() == pytest.approx(dref[:, 1].min(), abs=1e-6)
        if material == "CdSe":  # every Cd has Se neighbours at the bond length (tetrahedra)
            cd, se = p.positions[p.symbols == "Cd"], p.positions[p.symbols == "Se"]
            dist, _ = cKDTree(se).query(cd)
            assert np.median(dist) == pytest.approx(2.63, abs=0.01)


@pytest.mark.parametrize("shape", ["octahedron", "truncated_octahedron", "wulff"])
def test_size_is_the_volume_equivalent_diameter(shape):
    rng = np.random.default_rng(4)
    a = stacking.LATTICES["Au", "fcc"].lattice_constant
    for size in (3.0, 6.0):
        p = particles.single_crystal(rng, "Au", size, shape=shape)
        volume = p.params["n_atoms"] * a**3 / 4.0  # four atoms per fcc cell
        assert (6 * volume / math.pi) ** (1 / 3) / 10 == pytest.approx(size, rel=0.15)
        assert p.params["shape"] == shape


def test_multiply_twinned_particles_show_their_axis():
    rng = np.random.default_rng(8)
    p = particles.multiply_twinned(rng, "Au", 4.0, shape="decahedron")
    # five-fold symmetry about the beam (up to the small zone jitter)
    five = p.rotation @ np.array([0.0, 0.0, 1.0])
    assert abs(five[2]) >= math.cos(math.radians(orientation.ZONE_JITTER_DEG)) - 1e-9
    assert p.params["size_nm"] == pytest.approx(4.0, rel=0.25)
    assert p.params["defects"][0]["type"] == "multiply_twinned"
    q = particles.multiply_twinned(rng, "Pd", 5.0, shape="icosahedron")
    assert q.params["zone_axis"] in ("two-fold", "five-fold")
    with pytest.raises(ValueError):
        particles.multiply_twinned(rng, "CdSe", 3.0)


def test_particles_are_reproducible_from_the_generator():
    a = particles.single_crystal(np.random.default_rng(9), "Pd", 4.0, defects=("twin",))
    b = particles.single_crystal(np.random.default_rng(9), "Pd", 4.0, defects=("twin",))
    assert np.array_equal(a.positions, b.positions) and a.params == b.params


# --------------------------------------------------------------------------------------------
# Amorphous carbon


def test_amorphous_carbon_density_and_minimum_distance():
    rng = np.random.default_rng(1)
    extent, thickness = (60.0, 50.0), 20.0
    pts = carbon.amorphous_carbon(rng, extent, thickness, density_g_cm3=2.0, min_distance=1.35)
    # density: atoms · 12.011 u / volume
    grams = len(pts) * 12.011 / 6.02214076e23
    volume_cm3 = extent[0] * extent[1] * thickness * 1e-24
    assert grams / volume_cm3 == pytest.approx(2.0, rel=2e-3)
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() < extent[0]
    assert pts[:, 2].min() >= 0 and pts[:, 2].max() < thickness
    # closest pair, periodic images in x and y included
    tree = cKDTree(pts, boxsize=[extent[0], extent[1], 10 * thickness])
    d, _ = tree.query(pts, k=2)
    assert d[:, 1].min() >= 1.35 - 1e-9
    # and not a lattice: close pairs do exist, near the minimum
    assert np.percentile(d[:, 1], 5) < 1.6
    # uniform in depth: both halves hold about half the atoms
    assert abs((pts[:, 2] < thickness / 2).mean() - 0.5) < 0.05
