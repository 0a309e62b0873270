"""Physics-based training data: HRTEM of nanoparticles on amorphous carbon by abTEM multislice.

``latticewatch simulate`` writes one dataset directory (layout in :data:`LAYOUT`); this module
composes the scenes, runs abTEM, rasterises the ground truth and writes, resumes and summarises
the dataset. The fast analytic generator (:mod:`latticewatch.testing.synthetic`) stays for tests.

One image, step by step
-----------------------
1. **Conditions** (:func:`draw_conditions`): pixel size, 300 kV, defocus, residual aberrations
   (A1, B2, A2, Cs, C5), focal spread, illumination convergence, dose, detector, carbon
   thickness, which side of the film the particles sit on.
2. **Scene** (:func:`compose_scene`): 1–N particles (:mod:`latticewatch.training.simulate.structures`)
   placed inside the field of view, at least ``min_gap_nm`` apart in projection so the binary
   mask keeps them apart, except the members of an agglomerate, which touch (their nearest
   projected atoms 2.4–2.9 Å apart) and form one instance. Every particle rests on the carbon
   film (a 2.5 Å gap). Thermal displacements (Gaussian, r.m.s. from Debye–Waller factors) are
   added to the particle atoms.
3. **Exit wave** (:func:`exit_wave`): abTEM ``Potential`` (independent-atom model, Lobato
   parametrisation, infinite projection within a slice) on a periodic cell of the field of view,
   sampled ``f`` times finer than the detector (``f >= 2``, sampling at most
   ``max_sim_sampling_angstrom``), sliced every ``slice_thickness_angstrom``; plane-wave
   multislice with abTEM's 2/3 antialiasing aperture.
4. **Image** (:func:`image_intensity`): the objective lens (abTEM ``CTF``: aberrations and the
   spatial-coherence envelope of the illumination convergence) is applied to the exit wave at
   ``focal_nodes`` Gauss–Hermite defoci of the focal spread and the intensities are summed with
   their weights. This incoherent focal integration is the correct treatment of partial
   temporal coherence for a strong scatterer; the quasi-coherent envelope (``focal_spread`` in
   abTEM's CTF) is only valid for weak objects, and the extra cost (two FFTs per node) is small
   next to the multislice.
5. **Detector** (:func:`detect`): the intensity is integrated over each detector pixel (mean of
   ``f × f`` samples: the pixel's own sinc MTF, with aliasing, as on a real camera), then
   ``MTF(ν) = 1 / (1 + (ν/ν₀)^p)`` (ν in units of Nyquist) models the charge spread. A
   ``counting`` camera (direct electron detector in counting mode) blurs the signal and then
   counts, so its noise is white; an ``integrating`` camera (scintillator + CMOS, e.g. a Ceta)
   counts electrons and then blurs them, so its noise is blurred too. Counts are
   ``Poisson(dose · pixel area · intensity)``, stored as float32.
6. **Ground truth** (:func:`rasterise`): the particle mask is the projected footprint of the
   particle's atoms: every pixel whose centre lies within :data:`MASK_ATOM_RADIUS_NM` of a
   projected atom centre (after thermal displacement), closed with a disc of
   :data:`MASK_CLOSING_NM` (fills the notches between surface columns) and with enclosed holes
   filled. An agglomerate is one instance. Contrast delocalised outside the particle by the
   lens (fringes running past the edge at large defocus) is deliberately not in the mask.

Reproducibility
---------------
Image ``i`` of a dataset with seed ``s`` uses ``numpy.random.SeedSequence([s, i])`` only, split
into independent streams for conditions, scene, carbon, thermal motion, noise and crops; FFTs
are numpy's (pocketfft, deterministic), abTEM and numba run single-threaded. The same seed
therefore gives the same images whatever ``--workers`` and however often a run is resumed
(for the same versions of numpy, abTEM and ase, which ``dataset.json`` records).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import ndimage
from scipy.spatial import cKDTree

from latticewatch import __version__
from latticewatch.io.atomic import write_atomic
from latticewatch.frame import CLASSES
from latticewatch.training.simulate import structures as st
from latticewatch.errors import InputError

logger = logging.getLogger("latticewatch.training.simulate")

#: Identifies the image model; a dataset written by another generator is not resumed.
GENERATOR = "latticewatch.abtem/1"
#: Format of ``DIR/dataset.json`` and of the per-image JSON files.
DATASET_FORMAT = "latticewatch.simulate/1"
IMAGE_FORMAT = "latticewatch.simulate.image/1"

#: Radius of the disc drawn around each projected atom centre for the particle mask (nm): about
#: the metallic radius of Au (0.144 nm), Pd (0.137 nm) and Cd (0.151 nm). Neighbouring columns
#: of any zone axis are closer than two radii or enclose their gap, so the union with holes
#: filled is one solid footprint whose edge lies one atomic radius outside the outermost atoms.
MASK_ATOM_RADIUS_NM = 0.15
#: Radius of the morphological closing applied to the union of discs (nm): it fills the notches
#: between surface columns (CdSe columns on a facet are up to 0.4 nm apart), so the outline runs
#: smoothly over the outermost atoms, as a hand-drawn label does. It never adds a pixel farther
#: than this from the discs, nor outside their convex hull.
MASK_CLOSING_NM = 0.3

#: Classes a particle can have (``empty`` is an image or crop without one).
PARTICLE_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if c != "empty")

#: r.m.s. thermal displacement (Å) per element at room temperature, ``sqrt(B / 8π²)`` from
#: Debye–Waller factors: Au B ≈ 0.60 Å², Pd 0.45 Å², Cd (in CdSe) 1.1 Å², Se 0.8 Å².
THERMAL_RMS_ANGSTROM: dict[str, float] = {"Au": 0.087, "Pd": 0.075, "Cd": 0.118, "Se": 0.101}

LAYOUT = """\
DIR/dataset.json                 generator, seed, n, config, versions (a resume must match it)
DIR/README.md                    dataset card (regenerated from the per-image JSON at the end)
DIR/images/<name>.mrc            float32 electron counts; voxel size = pixel size in Å
DIR/labels/<name>.png            uint8 particle mask, 0 / 255
DIR/instances/<name>.tif         uint16 instance map, 0 = background, i = particle i
DIR/particles/<name>.json        conditions + particles (class, structure, bbox, defects, crops)
DIR/crops/<name>_pNN.mrc         square crop around particle NN (float32 counts)
DIR/crops/<name>_pNN_mask.png    its mask (that particle only), 0 / 255
DIR/crops/<name>_eNN.mrc (+mask) bare-carbon crop with a blob mask (class empty)
DIR/crops/index.csv              crop, mask, class, image, instance, pixel_size_nm
"""

_DEFAULT_CLASS_WEIGHTS = {"stacking_fault": 0.25, "no_stacking_fault": 0.3, "misoriented": 0.25, "agglomeration": 0.2, "empty": 0.05}


def _pair(lo_hi: Any) -> tuple[float, float]:
    lo, hi = (float(x) for x in lo_hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"expected (low, high) with low <= high, got {lo_hi!r}")
    return lo, hi


class SimulationConfig(BaseModel):
    """Everything that decides what a dataset contains; stored in ``DIR/dataset.json``.

    Ranges are ``(low, high)`` drawn uniformly per image (dose: log-uniformly). Class weights:
    the four particle classes are drawn per particle; ``empty`` is the fraction of images with no
    particle (and enables bare-carbon crops). Leaving a class out (weight 0 or absent) means it
    never appears.

    Examples
    --------
    >>> SimulationConfig(materials={"Au": 1.0}).pixel_size_nm
    (0.02, 0.05)
    >>> from pydantic import ValidationError
    >>> try:
    ...     SimulationConfig(classes={"glitter": 1.0})
    ... except ValidationError as err:
    ...     print(err.errors()[0]["msg"])
    Value error, unknown class 'glitter'; classes are stacking_fault, no_stacking_fault, misoriented, agglomeration, empty
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=64, le=4096, description="image side in pixels")
    pixel_size_nm: tuple[float, float] = (0.02, 0.05)
    materials: dict[str, float] = Field(default_factory=lambda: {"Au": 1.0, "Pd": 1.0, "CdSe": 1.0})
    classes: dict[str, float] = Field(default_factory=lambda: dict(_DEFAULT_CLASS_WEIGHTS))
    particle_size_nm: tuple[float, float] = (2.0, 10.0)
    particles_per_image: tuple[int, int] = (1, 5)
    #: Of stacking-fault particles of Au/Pd, the share that are decahedra/icosahedra.
    multiply_twinned_fraction: float = Field(0.3, ge=0, le=1)
    #: Of single-crystal stacking-fault particles, the share with two planar defects.
    second_defect_fraction: float = Field(0.2, ge=0, le=1)
    #: Of misoriented particles, the share that carry a (then invisible) planar defect.
    hidden_defect_fraction: float = Field(0.25, ge=0, le=1)
    agglomerate_members: tuple[int, int] = (2, 3)
    min_gap_nm: float = Field(0.5, gt=0)
    edge_margin_nm: float = Field(0.5, ge=0)
    min_off_zone_deg: float = Field(5.0, ge=1, le=30)
    carbon_thickness_nm: tuple[float, float] = (2.0, 5.0)
    carbon_density_g_cm3: float = Field(2.0, gt=0.5, le=3.5)
    carbon_min_distance_angstrom: float = Field(1.35, gt=0.5, le=2.0)
    energy_kev: float = Field(300.0, gt=0)
    defocus_nm: tuple[float, float] = (-50.0, 50.0)
    cs_um: tuple[float, float] = (-20.0, 20.0)
    c5_mm: tuple[float, float] = (0.0, 4.0)
    astigmatism_a1_nm: tuple[float, float] = (0.0, 3.0)
    coma_b2_nm: tuple[float, float] = (0.0, 50.0)
    astigmatism_a2_nm: tuple[float, float] = (0.0, 50.0)
    focal_spread_nm: tuple[float, float] = (1.5, 3.5)
    convergence_mrad: tuple[float, float] = (0.05, 0.2)
    dose_e_per_a2: tuple[float, float] = (200.0, 5000.0)
    detectors: dict[str, float] = Field(default_factory=lambda: {"counting": 1.0, "integrating": 1.0})
    mtf_nu0_counting: tuple[float, float] = (1.5, 3.0)
    mtf_nu0_integrating: tuple[float, float] = (0.35, 0.8)
    mtf_power: tuple[float, float] = (2.0, 3.0)
    max_sim_sampling_angstrom: float = Field(0.2, gt=0.02, le=0.5)
    slice_thickness_angstrom: float = Field(2.0, gt=0.2, le=10.0)
    focal_nodes: int = Field(7, ge=1, le=21)
    crop_min_px: int = Field(128, ge=16)
    crop_scale: float = Field(2.0, ge=1.0)

    @field_validator(
        "pixel_size_nm", "particle_size_nm", "carbon_thickness_nm", "defocus_nm", "cs_um", "c5_mm",
        "astigmatism_a1_nm", "coma_b2_nm", "astigmatism_a2_nm", "focal_spread_nm", "convergence_mrad",
        "dose_e_per_a2", "mtf_nu0_counting", "mtf_nu0_integrating", "mtf_power",
    )
    @classmethod
    def _range(cls, v):
        return _pair(v)

    @field_validator("particles_per_image", "agglomerate_members")
    @classmethod
    def _int_range(cls, v):
        lo, hi = (int(x) for x in v)
        if not 1 <= lo <= hi:
            raise ValueError(f"expected (low, high) with 1 <= low <= high, got {v!r}")
        return lo, hi

    @field_validator("materials")
    @classmethod
    def _materials(cls, v):
        for name, w in v.items():
            if name not in st.STRUCTURES:
                raise ValueError(f"unknown material {name!r}; materials are {', '.join(st.STRUCTURES)}")
            if not w >= 0:
                raise ValueError(f"weight of {name} must be >= 0, got {w}")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one material needs a positive weight")
        return dict(v)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        for name, w in v.items():
            if name not in CLASSES:
                raise ValueError(f"unknown class {name!r}; classes are {', '.join(CLASSES)}")
            if not w >= 0:
                raise ValueError(f"weight of {name} must be >= 0, got {w}")
        if not any(v.get(c, 0) > 0 for c in PARTICLE_CLASSES) and not v.get("empty", 0) > 0:
            raise ValueError("at least one class needs a positive weight")
        return {c: float(v[c]) for c in CLASSES if c in v}

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, v):
        for name in v:
            if name not in ("counting", "integrating"):
                raise ValueError(f"unknown detector {name!r}; detectors are counting, integrating")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one detector needs a positive weight")
        return dict(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.pixel_size_nm[0] <= 0:
            raise ValueError("pixel_size_nm must be positive")
        if self.particle_size_nm[0] < 1.0:
            raise ValueError("particle_size_nm: particles below 1 nm are not crystals; use at least 1")
        if self.dose_e_per_a2[0] <= 0:
            raise ValueError("dose_e_per_a2 must be positive")
        fov = self.size * self.pixel_size_nm[0]
        if self.particle_size_nm[0] > 0.6 * fov:
            raise ValueError(
                f"particles of {self.particle_size_nm[0]} nm do not fit a {fov:.1f} nm field of view "
                f"({self.size} px at {self.pixel_size_nm[0]} nm); raise size or pixel_size_nm"
            )
        return self

    @property
    def particle_classes(self) -> dict[str, float]:
        """Positive weights of the particle classes."""
        return {c: w for c, w in self.classes.items() if c != "empty" and w > 0}

    @property
    def empty_fraction(self) -> float:
        """Fraction of images without particles (0 when no particle class is enabled: 1)."""
        if not self.particle_classes:
            return 1.0
        return float(min(1.0, self.classes.get("empty", 0.0)))


#: Named starting points for ``--preset``; options given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Groschner et al. (2020, 2021), Au: FEI Themis with image aberration correction at 300 kV,
    # SerialEM autofocus "within approximately 100 nm of Gaussian focus", 4k camera (a
    # scintillator camera: integrating detector). The papers state neither pixel size nor dose;
    # 0.02–0.03 nm/pixel is what lattice-resolved 4k frames of 2–10 nm particles need, the dose
    # range is the default. Images without particles were discarded from their data sets.
    "papers-au": {
        "materials": {"Au": 1.0},
        "classes": {"stacking_fault": 0.25, "no_stacking_fault": 0.3, "misoriented": 0.25, "agglomeration": 0.2},
        "pixel_size_nm": (0.02, 0.03),
        "defocus_nm": (-100.0, 100.0),
        "detectors": {"integrating": 1.0},
        "particles_per_image": (1, 6),
    },
}


def preset_config(name: str = "default", **overrides: Any) -> SimulationConfig:
    """The configuration of a preset with ``overrides`` (``None`` values are ignored).

    Examples
    --------
    >>> preset_config("papers-au").materials
    {'Au': 1.0}
    >>> preset_config("papers-au", size=256).pixel_size_nm
    (0.02, 0.03)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return SimulationConfig(**values)


# --------------------------------------------------------------------------------------------
# Random streams


_STREAMS = ("conditions", "scene", "carbon", "thermal", "noise", "crops")


def image_streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators for the stages of image ``index`` of a dataset with ``seed``.

    Examples
    --------
    >>> a, b = image_streams(1, 7), image_streams(1, 7)
    >>> float(a["scene"].random()) == float(b["scene"].random())
    True
    """
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


# --------------------------------------------------------------------------------------------
# Conditions


def draw_conditions(rng: np.random.Generator, config: SimulationConfig) -> dict[str, Any]:
    """Imaging conditions of one image: optics, dose, detector, carbon, sampling.

    Aberrations are in abTEM's polar notation (``C10 = -defocus``; magnitudes in Å, angles in
    radians) and repeated in microscopists' names and units. ``defocus_nm > 0`` is underfocus.

    Examples
    --------
    >>> c = draw_conditions(np.random.default_rng(0), SimulationConfig())
    >>> c["simulation"]["oversampling"] >= 2, 200 <= c["dose_e_per_a2"] <= 5000
    (True, True)
    """
    px_nm = float(rng.uniform(*config.pixel_size_nm))
    px = 10.0 * px_nm
    defocus_nm = float(rng.uniform(*config.defocus_nm))
    a1, b2, a2 = (float(rng.uniform(*r)) for r in (config.astigmatism_a1_nm, config.coma_b2_nm, config.astigmatism_a2_nm))
    phi12, phi21, phi23 = (float(rng.uniform(0, 2 * math.pi)) for _ in range(3))
    cs_um, c5_mm = float(rng.uniform(*config.cs_um)), float(rng.uniform(*config.c5_mm))
    focal_nm = float(rng.uniform(*config.focal_spread_nm))
    convergence = float(rng.uniform(*config.convergence_mrad))
    lo, hi = config.dose_e_per_a2
    dose = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    detector = _choice(rng, config.detectors)
    nu0 = float(rng.uniform(*(config.mtf_nu0_counting if detector == "counting" else config.mtf_nu0_integrating)))
    power = float(rng.uniform(*config.mtf_power))
    carbon_nm = float(rng.uniform(*config.carbon_thickness_nm))
    side = "beam_entrance" if rng.random() < 0.5 else "beam_exit"
    f = max(2, math.ceil(px / config.max_sim_sampling_angstrom - 1e-9))
    return {
        "pixel_size_nm": px_nm,
        "energy_kev": config.energy_kev,
        "defocus_nm": defocus_nm,
        "defocus_convention": "positive = underfocus (abTEM defocus = -C10)",
        "aberrations": {
            "C10": -10.0 * defocus_nm, "C12": 10.0 * a1, "phi12": phi12, "C21": 10.0 * b2, "phi21": phi21,
            "C23": 10.0 * a2, "phi23": phi23, "C30": 1e4 * cs_um, "C50": 1e7 * c5_mm,
        },
        "aberrations_readable": {
            "A1_nm": a1, "A1_angle_deg": math.degrees(phi12), "B2_nm": b2, "B2_angle_deg": math.degrees(phi21),
            "A2_nm": a2, "A2_angle_deg": math.degrees(phi23), "Cs_um": cs_um, "C5_mm": c5_mm,
        },
        "focal_spread_rms_nm": focal_nm,
        "information_limit_nm": _information_limit_nm(focal_nm, config.energy_kev),
        "convergence_mrad": convergence,
        "dose_e_per_a2": dose,
        "dose_e_per_px": dose * px * px,
        "detector": {"mode": detector, "mtf_nu0": nu0, "mtf_power": power,
                     "mtf_at_nyquist": _blur_mtf(np.array(1.0), nu0, power).item() * 2 / math.pi},
        "carbon": {"thickness_nm": carbon_nm, "density_g_cm3": config.carbon_density_g_cm3,
                   "min_distance_angstrom": config.carbon_min_distance_angstrom},
        "particles_side": side,
        "simulation": {
            "oversampling": f,
            "sampling_angstrom": px / f,
            "gpts": config.size * f,
            "slice_thickness_angstrom": config.slice_thickness_angstrom,
            "focal_nodes": config.focal_nodes,
            "potential": "abTEM independent-atom model, Lobato parametrisation, infinite projection",
            "antialias": "abTEM 2/3 of Nyquist",
        },
    }


def wavelength_angstrom(energy_kev: float) -> float:
    """Relativistic electron wavelength (Å).

    Examples
    --------
    >>> round(wavelength_angstrom(300.0), 5)
    0.01969
    """
    e = energy_kev * 1e3
    return 12.2642598 / math.sqrt(e * (1.0 + 0.97846e-6 * e))


def _information_limit_nm(focal_rms_nm: float, energy_kev: float) -> float:
    # where the temporal envelope exp(-(π λ Δ)² k⁴ / 2) drops to exp(-2)
    lam = wavelength_angstrom(energy_kev)
    return float(math.sqrt(math.pi * lam * 10.0 * focal_rms_nm / 2.0) / 10.0)


def _blur_mtf(nu: np.ndarray, nu0: float, power: float) -> np.ndarray:
    return 1.0 / (1.0 + (nu / nu0) ** power)


# --------------------------------------------------------------------------------------------
# Scene


@dataclass
class PlacedParticle:
    """A particle of the scene: one or more members (an agglomerate has several), placed.

    ``offsets`` are the ``(x, y)`` positions (Å, cell frame) of each member's centre.
    """

    instance: int
    label: str
    material: str
    members: list[st.Particle]
    offsets: list[np.ndarray]
    contact_angstrom: list[float] = field(default_factory=list)

    def projected(self) -> np.ndarray:
        """``(n, 2)`` projected atom positions of all members (Å, cell frame)."""
        return np.vstack([m.positions[:, :2] + o for m, o in zip(self.members, self.offsets)])


@dataclass
class Scene:
    """What goes into the multislice cell."""

    fov: float  # Å
    particles: list[PlacedParticle]
    empty_field: bool


def _member(rng: np.random.Generator, config: SimulationConfig, material: str, kind: str, size: float) -> st.Particle:
    structure = str(rng.choice(st.STRUCTURES[material]))
    if kind == "perfect":
        return st.single_crystal(rng, material, size, structure=structure)
    if kind == "faulted":
        if material in ("Au", "Pd") and rng.random() < config.multiply_twinned_fraction:
            return st.multiply_twinned(rng, material, size)
        n_defects = 2 if rng.random() < config.second_defect_fraction else 1
        defects = tuple(str(rng.choice(st.DEFECTS[structure])) for _ in range(n_defects))
        for attempt in range(4):
            try:
                return st.single_crystal(rng, material, size, structure=structure, defects=defects)
            except ValueError:  # too few layers for the defects: one fewer, then a larger particle
                defects = defects[:1]
                size *= 1.0 if attempt == 0 else 1.25
        raise ValueError(f"no room for a planar defect in a {size:.1f} nm {material} particle")
    if kind == "misoriented":
        defects = (str(rng.choice(st.DEFECTS[structure])),) if rng.random() < config.hidden_defect_fraction else ()
        try:
            return st.single_crystal(rng, material, size, structure=structure, defects=defects, on_zone=False,
                                     min_off_zone_deg=config.min_off_zone_deg)
        except ValueError:  # too small for the (invisible anyway) defect
            return st.single_crystal(rng, material, size, structure=structure, on_zone=False,
                                     min_off_zone_deg=config.min_off_zone_deg)
    raise ValueError(kind)


_KIND_OF_CLASS = {"no_stacking_fault": "perfect", "stacking_fault": "faulted", "misoriented": "misoriented"}


def _agglomerate(rng: np.random.Generator, config: SimulationConfig, material: str, size_hi: float) -> tuple[list, list, list]:
    n = int(rng.integers(config.agglomerate_members[0], config.agglomerate_members[1] + 1))
    members, offsets, contacts = [], [], []
    lo = min(config.particle_size_nm[0], size_hi)
    for m in range(n):
        kind = str(rng.choice(["perfect", "faulted", "misoriented"]))
        particle = _member(rng, config, material, kind, float(rng.uniform(lo, size_hi)))
        if m == 0:
            members.append(particle)
            offsets.append(np.zeros(2))
            continue
        # Slide the new member in from a random direction towards a random earlier one until
        # its nearest projected atom is `contact` from theirs: touching, never overlapping.
        contact = float(rng.uniform(2.4, 2.9))
        anchor = offsets[int(rng.integers(len(offsets)))]
        theta = float(rng.uniform(0, 2 * math.pi))
        direction = np.array([math.cos(theta), math.sin(theta)])
        tree = cKDTree(np.vstack([p.positions[:, :2] + o for p, o in zip(members, offsets)]))
        start = particle.positions[:, :2] + anchor
        # far enough that no earlier member is within reach, so the gap at `far` is positive
        far = max(float(np.hypot(*(o - anchor))) + p.radius_xy for p, o in zip(members, offsets)) + particle.radius_xy + 2 * contact
        near = 0.0
        for _ in range(40):
            mid = 0.5 * (near + far)
            near, far = (mid, far) if _nearest(tree, start + mid * direction) < contact else (near, mid)
        members.append(particle)
        offsets.append(anchor + far * direction)
        contacts.append(_nearest(tree, start + far * direction))
    return members, offsets, contacts


def _nearest(tree: cKDTree, points: np.ndarray) -> float:
    return float(tree.query(points, k=1)[0].min())


def compose_scene(rng: np.random.Generator, config: SimulationConfig, conditions: dict[str, Any]) -> Scene:
    """Particles of one image, placed in the field of view without overlap (agglomerates touch).

    Distinct particles keep ``min_gap_nm`` between their masks (atoms ``min_gap_nm`` + two mask
    radii apart). Sizes are capped at 55 % of the field of view (agglomerate members at 30 %); a
    particle that finds no free place in 60 tries is left out, so crowded images hold fewer
    particles than drawn.

    Examples
    --------
    >>> cfg = SimulationConfig(size=128, pixel_size_nm=(0.05, 0.05), particle_size_nm=(2, 3), materials={"Pd": 1})
    >>> cond = draw_conditions(np.random.default_rng(0), cfg)
    >>> scene = compose_scene(np.random.default_rng(1), cfg, cond)
    >>> all(p.instance == i + 1 for i, p in enumerate(scene.particles))
    True
    """
    fov = 10.0 * config.size * conditions["pixel_size_nm"]
    if not config.particle_classes or rng.random() < config.empty_fraction:
        return Scene(fov, [], True)
    n = int(rng.integers(config.particles_per_image[0], config.particles_per_image[1] + 1))
    margin = 10.0 * config.edge_margin_nm
    gap = 10.0 * config.min_gap_nm
    # min_gap_nm is between masks; each mask reaches one atomic radius beyond the atoms
    footprint_margin = 2.0 * 10.0 * MASK_ATOM_RADIUS_NM
    placed: list[PlacedParticle] = []
    for _ in range(n):
        label = _choice(rng, config.particle_classes)
        material = _choice(rng, config.materials)
        for shrink in (1.0, 0.75, 0.55, 0.4):  # smaller when the drawn body does not fit the field
            if label == "agglomeration":
                size_hi = shrink * min(config.particle_size_nm[1], 0.3 * fov / 10.0)
                members, offsets, contacts = _agglomerate(rng, config, material, size_hi)
            else:
                size_hi = shrink * min(config.particle_size_nm[1], 0.55 * fov / 10.0)
                size = float(rng.uniform(min(config.particle_size_nm[0], size_hi), size_hi))
                members, offsets, contacts = [_member(rng, config, material, _KIND_OF_CLASS[label], size)], [np.zeros(2)], []
            candidate = PlacedParticle(len(placed) + 1, label, material, members, offsets, contacts)
            # Centre the bounding circle of the members on the drawn position.
            pts = candidate.projected()
            centre = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
            radius = float(np.hypot(*(pts - centre).T).max())
            room = 0.5 * fov - margin - radius
            if room >= 0:
                break
        else:
            continue
        rel = [o - centre for o in offsets]
        others = [(_centre_of(p), _radius_of(p), cKDTree(p.projected())) for p in placed]
        for _ in range(60):
            pos = 0.5 * fov + rng.uniform(-room, room, size=2)
            if all(_apart(pos, radius, pts - centre, other, gap + footprint_margin) for other in others):
                candidate.offsets = [pos + r for r in rel]
                placed.append(candidate)
                break
    return Scene(fov, placed, not placed)


def _apart(pos: np.ndarray, radius: float, pts: np.ndarray, other: tuple, gap: float) -> bool:
    """Whether atoms ``pts`` placed at ``pos`` keep ``gap`` from another particle's atoms."""
    centre, other_radius, tree = other
    if np.hypot(*(pos - centre)) >= radius + other_radius + gap:
        return True  # bounding circles apart: no need to look at atoms
    return bool(tree.query(pts + pos, k=1, distance_upper_bound=gap)[0].min() >= gap)


def _centre_of(p: PlacedParticle) -> np.ndarray:
    pts = p.projected()
    return 0.5 * (pts.min(axis=0) + pts.max(axis=0))


def _radius_of(p: PlacedParticle) -> float:
    pts = p.projected()
    return float(np.hypot(*(pts - _centre_of(p)).T).max())


# --------------------------------------------------------------------------------------------
# Atoms and slicing


@dataclass
class Cell:
    """The multislice cell: atoms (Å), cell size, slice thicknesses, and where the particles lie."""

    symbols: np.ndarray
    positions: np.ndarray
    size: tuple[float, float, float]
    slices: tuple[float, ...]
    particle_atoms: list[np.ndarray]  # per scene particle: (n, 3) positions as simulated
    n_carbon: int


def build_cell(
    scene: Scene,
    conditions: dict[str, Any],
    config: SimulationConfig,
    carbon_rng: np.random.Generator,
    thermal_rng: np.random.Generator,
) -> Cell:
    """Stack the particles on the carbon film and slice the cell.

    The film is periodic in ``x`` and ``y`` like the cell; particles rest on it with a 2.5 Å
    gap between their lowest (or highest) atoms and the film surface.
    """
    t_c = 10.0 * conditions["carbon"]["thickness_nm"]
    carbon = st.amorphous_carbon(
        carbon_rng, (scene.fov, scene.fov), t_c,
        density_g_cm3=config.carbon_density_g_cm3, min_distance=config.carbon_min_distance_angstrom,
    )
    margin, gap = 1.0, 2.5
    thick = max((m.thickness for p in scene.particles for m in p.members), default=0.0)
    entrance = conditions["particles_side"] == "beam_entrance"
    if entrance:  # beam meets the particles first, then the film
        surface = margin + thick
        carbon_z0 = surface + gap
        total = carbon_z0 + t_c + margin
    else:
        carbon_z0 = margin
        surface = margin + t_c + gap
        total = surface + thick + margin
    carbon = carbon + [0.0, 0.0, carbon_z0]

    symbols = [np.full(len(carbon), "C")]
    positions = [carbon]
    particle_atoms = []
    for p in scene.particles:
        atoms = []
        for member, offset in zip(p.members, p.offsets):
            pos = member.positions.copy()
            pos[:, :2] += offset
            pos[:, 2] += (surface - pos[:, 2].max()) if entrance else (surface - pos[:, 2].min())
            rms = np.array([THERMAL_RMS_ANGSTROM.get(s, 0.08) for s in member.symbols])
            pos += thermal_rng.normal(size=pos.shape) * rms[:, None]
            atoms.append(pos)
            symbols.append(np.asarray(member.symbols))
            positions.append(pos)
        particle_atoms.append(np.vstack(atoms))
    positions = np.vstack(positions)
    positions[:, :2] %= scene.fov  # the film wraps; particles lie inside anyway
    # Uniform slices that end exactly on the cell boundary.
    n_slices = max(1, math.ceil(total / config.slice_thickness_angstrom - 1e-9))
    slices = (total / n_slices,) * n_slices
    return Cell(np.concatenate(symbols), positions, (scene.fov, scene.fov, total), slices, particle_atoms, len(carbon))


# --------------------------------------------------------------------------------------------
# Imaging (abTEM)


_ABTEM_READY = False


def configure_abtem() -> None:
    """Set abTEM for deterministic single-threaded use: numpy FFT, eager evaluation, synchronous
    dask, one numba thread.

    Raises
    ------
    ImportError
        When abTEM is not installed (the ``[simulate]`` extra).
    """
    global _ABTEM_READY
    if _ABTEM_READY:
        return
    import abtem
    import dask
    import numba

    # numpy's pocketfft gives the same bits every run; FFTW plans measured at run time need not.
    abtem.config.set({"device": "cpu", "fft": "numpy", "dask.lazy": False, "diagnostics.progress_bar": False})
    dask.config.set(scheduler="synchronous")
    numba.set_num_threads(1)
    _ABTEM_READY = True


def exit_wave(cell: Cell, gpts: int, energy_kev: float):
    """Plane-wave multislice through the cell; returns the abTEM ``Waves`` (computed).

    Arrays are indexed ``[x, y]`` with sample ``i`` at ``x = i · sampling``.
    """
    configure_abtem()
    import abtem
    from ase import Atoms

    atoms = Atoms(symbols=list(cell.symbols), positions=cell.positions, cell=list(cell.size), pbc=True)
    potential = abtem.Potential(
        atoms, gpts=(gpts, gpts), slice_thickness=cell.slices, projection="infinite", parametrization="lobato",
    )
    return abtem.PlaneWave(energy=energy_kev * 1e3).multislice(potential)


def image_intensity(waves, conditions: dict[str, Any]) -> np.ndarray:
    """Image intensity ``[x, y]`` after the objective lens with incoherent focal integration.

    The focal spread (r.m.s. ``σ``) is integrated by Gauss–Hermite quadrature: defoci
    ``C10 + √2·σ·tᵢ`` with weights ``wᵢ/√π``. Convergence enters through abTEM's spatial
    envelope. Vacuum has intensity 1.
    """
    import abtem

    nodes, weights = np.polynomial.hermite.hermgauss(conditions["simulation"]["focal_nodes"])
    sigma = 10.0 * conditions["focal_spread_rms_nm"]
    ab = dict(conditions["aberrations"])
    total = None
    for t, w in zip(nodes, weights):
        coeffs = {**ab, "C10": ab["C10"] + math.sqrt(2.0) * sigma * float(t)}
        ctf = abtem.CTF(energy=conditions["energy_kev"] * 1e3, angular_spread=conditions["convergence_mrad"],
                        aberration_coefficients=coeffs)
        intensity = np.asarray(waves.apply_ctf(ctf).intensity().array, np.float64)
        total = intensity * (w / math.sqrt(math.pi)) if total is None else total + intensity * (w / math.sqrt(math.pi))
    return total


def detect(
    intensity: np.ndarray,
    oversampling: int,
    dose_per_px: float,
    detector: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Detector pixels from an oversampled intensity: integrate, blur, count.

    Parameters
    ----------
    intensity
        ``[x, y]`` intensity (vacuum = 1), side ``oversampling · n``.
    oversampling
        Samples per detector pixel along each axis.
    dose_per_px
        Electrons per detector pixel in vacuum.
    detector
        ``mode`` (``counting``: blur then Poisson, white noise; ``integrating``: Poisson then blur),
        ``mtf_nu0`` and ``mtf_power`` of ``1 / (1 + (ν/ν₀)^p)``, ν in units of Nyquist.
    rng
        Source of the shot noise.

    Returns
    -------
    counts, expected
        ``[row, col]`` float32 counts and the noise-free expectation (after the blur).

    Examples
    --------
    >>> flat = np.ones((64, 64))
    >>> counts, expected = detect(flat, 2, 100.0, {"mode": "counting", "mtf_nu0": 2.0, "mtf_power": 2.0},
    ...                           np.random.default_rng(0))
    >>> counts.shape, round(float(expected.mean()), 6), abs(float(counts.mean()) - 100) < 3
    ((32, 32), 100.0, True)
    """
    n = intensity.shape[0] // oversampling
    binned = intensity[: n * oversampling, : n * oversampling].reshape(n, oversampling, n, oversampling).mean(axis=(1, 3))
    image = binned.T * dose_per_px  # [x, y] -> [row = y, col = x]
    ky = np.fft.fftfreq(image.shape[0])[:, None]
    kx = np.fft.rfftfreq(image.shape[1])[None, :]
    mtf = _blur_mtf(np.hypot(ky, kx) / 0.5, detector["mtf_nu0"], detector["mtf_power"])

    def blur(a: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(np.fft.rfft2(a) * mtf, s=a.shape)

    expected = blur(image)
    if detector["mode"] == "counting":
        counts = rng.poisson(np.clip(expected, 0, None)).astype(np.float64)
    elif detector["mode"] == "integrating":
        counts = blur(rng.poisson(np.clip(image, 0, None)).astype(np.float64))
    else:
        raise ValueError(f"unknown detector mode {detector['mode']!r}")
    return counts.astype(np.float32), expected.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Ground truth


def pixel_coordinates(xy: np.ndarray, pixel_size: float, sampling: float) -> np.ndarray:
    """``(row, col)`` pixel coordinates of cell positions ``(x, y)`` (Å).

    Detector pixel ``j`` averages samples ``j·f … j·f + f − 1``, so its centre is at
    ``j · pixel_size + (pixel_size − sampling) / 2``.

    Examples
    --------
    >>> pixel_coordinates(np.array([[1.5, 0.5]]), 1.0, 0.5).tolist()
    [[0.25, 1.25]]
    """
    shift = 0.5 * (pixel_size - sampling)
    return np.column_stack([(xy[:, 1] - shift) / pixel_size, (xy[:, 0] - shift) / pixel_size])


def footprint(
    rc: np.ndarray, radius_px: float, shape: tuple[int, int], closing_px: float = 0.0,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Mask of pixels within ``radius_px`` of any point ``rc`` (row, col), closed, holes filled.

    Parameters
    ----------
    rc
        ``(n, 2)`` points in pixel coordinates (pixel centres are integers).
    radius_px
        Disc radius around each point.
    shape
        Shape of the image the mask belongs to (the mask is clipped to it).
    closing_px
        Radius of a binary closing (disc) that fills notches narrower than twice it.

    Returns
    -------
    mask, box
        The mask over its bounding box and the box (slices into an image of ``shape``).

    Examples
    --------
    >>> mask, box = footprint(np.array([[10.0, 10.0]]), 2.0, (32, 32))
    >>> int(mask.sum()), (box[0].start, box[0].stop)
    (13, (7, 14))
    >>> two = np.array([[10.0, 10.0], [10.0, 15.0]])  # a notch between two discs ...
    >>> int(footprint(two, 2.0, (32, 32))[0].sum()), int(footprint(two, 2.0, (32, 32), 3.0)[0].sum())
    (26, 30)
    """
    pad = math.ceil(closing_px) + 1
    r0 = math.floor(rc[:, 0].min() - radius_px) - pad
    r1 = math.ceil(rc[:, 0].max() + radius_px) + 1 + pad
    c0 = math.floor(rc[:, 1].min() - radius_px) - pad
    c1 = math.ceil(rc[:, 1].max() + radius_px) + 1 + pad
    rows, cols = np.mgrid[r0:r1, c0:c1]
    dist, _ = cKDTree(rc).query(np.column_stack([rows.ravel(), cols.ravel()]), k=1, distance_upper_bound=radius_px + 1e-9)
    mask = (dist <= radius_px).reshape(rows.shape)
    if closing_px > 0:
        k = math.floor(closing_px)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        mask = ndimage.binary_closing(mask, structure=yy**2 + xx**2 <= closing_px**2)
    mask = ndimage.binary_fill_holes(mask)
    # The padded box may reach past the image: keep the part inside.
    b0, b1 = max(r0, 0), min(r1, shape[0])
    d0, d1 = max(c0, 0), min(c1, shape[1])
    return mask[b0 - r0:b1 - r0, d0 - c0:d1 - c0], (slice(b0, b1), slice(d0, d1))


def rasterise(scene: Scene, cell: Cell, conditions: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """Instance map (uint16, 0 = background) from the simulated particle atoms."""
    px = 10.0 * conditions["pixel_size_nm"]
    s = conditions["simulation"]["sampling_angstrom"]
    instances = np.zeros(shape, np.uint16)
    for p, atoms in zip(scene.particles, cell.particle_atoms):
        rc = pixel_coordinates(atoms[:, :2], px, s)
        mask, box = footprint(rc, 10.0 * MASK_ATOM_RADIUS_NM / px, shape, 10.0 * MASK_CLOSING_NM / px)
        target = instances[box]
        target[mask & (target == 0)] = p.instance
    return instances


# --------------------------------------------------------------------------------------------
# One image


@dataclass
class SimulatedImage:
    """One simulated micrograph and its truth."""

    name: str
    counts: np.ndarray  # float32 [row, col]
    instances: np.ndarray  # uint16
    record: dict[str, Any]  # the per-image JSON without crops and files
    crops: list[dict[str, Any]]  # windows + masks to cut


def image_name(index: int) -> str:
    """``sim_000042`` for index 42.

    Examples
    --------
    >>> image_name(42)
    'sim_000042'
    """
    return f"sim_{index:06d}"


def simulate_image(config: SimulationConfig, seed: int, index: int) -> SimulatedImage:
    """Simulate image ``index`` of the dataset with ``seed``: pure function of its arguments.

    Examples
    --------
    >>> cfg = SimulationConfig(size=64, pixel_size_nm=(0.05, 0.05), particle_size_nm=(1.5, 2.0),
    ...                        particles_per_image=(1, 1), carbon_thickness_nm=(1.0, 1.0), materials={"Au": 1})
    >>> sim = simulate_image(cfg, 0, 0)  # doctest: +SKIP
    >>> sim.counts.shape, sim.counts.dtype  # doctest: +SKIP
    ((64, 64), dtype('float32'))
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    rngs = image_streams(seed, index)
    conditions = draw_conditions(rngs["conditions"], config)
    scene = compose_scene(rngs["scene"], config, conditions)
    cell = build_cell(scene, conditions, config, rngs["carbon"], rngs["thermal"])
    sim = conditions["simulation"]
    waves = exit_wave(cell, sim["gpts"], conditions["energy_kev"])
    intensity = image_intensity(waves, conditions)
    counts, _ = detect(intensity, sim["oversampling"], conditions["dose_e_per_px"], conditions["detector"], rngs["noise"])
    shape = (config.size, config.size)
    instances = rasterise(scene, cell, conditions, shape)
    sim.update({"cell_angstrom": list(cell.size), "n_slices": len(cell.slices),
                "slice_thickness_angstrom": cell.slices[0], "n_atoms": len(cell.symbols)})
    conditions["carbon"]["n_atoms"] = cell.n_carbon
    particles = _particle_records(scene, cell, conditions, instances)
    name = image_name(index)
    record = {
        "format": IMAGE_FORMAT,
        "generator": GENERATOR,
        "name": name,
        "index": index,
        "seed": seed,
        "shape": list(shape),
        "pixel_size_nm": conditions["pixel_size_nm"],
        "empty_field": scene.empty_field,
        "conditions": conditions,
        "dose_e_per_a2": conditions["dose_e_per_a2"],
        "defocus_nm": conditions["defocus_nm"],
        "mask": {
            "definition": "pixels whose centre lies within atom_radius_nm of a projected particle atom centre, "
                          "closed with a disc of closing_nm, holes filled; an agglomerate is one instance",
            "atom_radius_nm": MASK_ATOM_RADIUS_NM,
            "closing_nm": MASK_CLOSING_NM,
        },
        "particles": particles,
    }
    crops = _crop_windows(rngs["crops"], config, instances, particles, conditions)
    record["seconds"] = time.perf_counter() - t0  # wall clock, as the worker saw it
    record["cpu_seconds"] = time.process_time() - cpu0  # what it cost, whatever else ran
    return SimulatedImage(name, counts, instances, record, crops)


def _particle_records(scene: Scene, cell: Cell, conditions: dict[str, Any], instances: np.ndarray) -> list[dict[str, Any]]:
    px = 10.0 * conditions["pixel_size_nm"]
    s = conditions["simulation"]["sampling_angstrom"]
    objects = ndimage.find_objects(instances.astype(np.int64))
    out = []
    for p in scene.particles:
        box = objects[p.instance - 1] if p.instance - 1 < len(objects) else None
        area = int(np.count_nonzero(instances == p.instance))
        bbox = [box[0].start, box[1].start, box[0].stop, box[1].stop] if box is not None else None
        members = []
        for member, offset in zip(p.members, p.offsets):
            rec = {k: v for k, v in member.params.items()}
            centre = pixel_coordinates(offset[None, :], px, s)[0]
            rec["centre_px"] = [float(centre[0]), float(centre[1])]
            rec["thickness_nm"] = member.thickness / 10.0
            defects = []
            for d in rec["defects"]:
                d = dict(d)
                if d["normal"] is not None:
                    n = np.asarray(d["normal"])
                    point = offset + 10.0 * d["offset_nm"] * n[:2]
                    rc = pixel_coordinates(point[None, :], px, s)[0]
                    d["point_px"] = [float(rc[0]), float(rc[1])]
                    d["normal_px"] = [float(n[1]), float(n[0])]  # (row, col) components
                    d["edge_on"] = bool(abs(n[2]) < math.sin(math.radians(1.0)))
                defects.append(d)
            rec["defects"] = defects
            members.append(rec)
        entry: dict[str, Any] = {
            "instance": p.instance,
            "class": p.label,
            "material": p.material,
            "bbox": bbox,
            "area_px": area,
            "equivalent_diameter_nm": math.sqrt(4.0 * area / math.pi) * conditions["pixel_size_nm"],
            "touches_edge": bool(bbox is not None and (bbox[0] == 0 or bbox[1] == 0 or bbox[2] == instances.shape[0] or bbox[3] == instances.shape[1])),
        }
        if len(members) == 1:
            entry.update({k: v for k, v in members[0].items() if k not in entry})
        else:
            entry["shape"] = "agglomerate"
            entry["size_nm"] = entry["equivalent_diameter_nm"]
            entry["centre_px"] = [float(np.mean([m["centre_px"][0] for m in members])), float(np.mean([m["centre_px"][1] for m in members]))]
            entry["contact_angstrom"] = p.contact_angstrom
        entry["members"] = members
        out.append(entry)
    return out


def _crop_windows(
    rng: np.random.Generator, config: SimulationConfig, instances: np.ndarray, particles: list[dict[str, Any]],
    conditions: dict[str, Any],
) -> list[dict[str, Any]]:
    """Square windows for the classifier: one per particle, plus one of bare carbon if allowed."""
    size = instances.shape[0]
    windows = []
    for p in particles:
        if p["bbox"] is None:
            continue
        r0, c0, r1, c1 = p["bbox"]
        side = min(size, max(config.crop_min_px, math.ceil(config.crop_scale * max(r1 - r0, c1 - c0))))
        top = _clamp(round(0.5 * (r0 + r1) - side / 2), 0, size - side)
        left = _clamp(round(0.5 * (c0 + c1) - side / 2), 0, size - side)
        mask = instances[top:top + side, left:left + side] == p["instance"]
        windows.append({"kind": "p", "number": p["instance"], "class": p["class"], "instance": p["instance"],
                        "window": [top, left, top + side, left + side], "mask": mask})
    if config.classes.get("empty", 0) > 0:
        side = min(size, config.crop_min_px)
        occupied = ndimage.binary_dilation(instances > 0, iterations=max(1, round(config.min_gap_nm / conditions["pixel_size_nm"])))
        for _ in range(60):
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not occupied[top:top + side, left:left + side].any():
                mask = _blob(rng, side, config, conditions["pixel_size_nm"])
                windows.append({"kind": "e", "number": 1, "class": "empty", "instance": 0,
                                "window": [top, left, top + side, left + side], "mask": mask})
                break
    return windows


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def _blob(rng: np.random.Generator, side: int, config: SimulationConfig, px_nm: float) -> np.ndarray:
    """An ellipse in the middle of a crop: the kind of region a segmenter finds in carbon by mistake."""
    d = min(rng.uniform(*config.particle_size_nm) / px_nm, 0.6 * side)
    a, b = 0.5 * d, 0.5 * d * float(rng.uniform(0.6, 1.0))
    phi = float(rng.uniform(0, math.pi))
    rows, cols = np.mgrid[0:side, 0:side] - (side - 1) / 2.0
    u = cols * math.cos(phi) + rows * math.sin(phi)
    v = -cols * math.sin(phi) + rows * math.cos(phi)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


# --------------------------------------------------------------------------------------------
# Writing


def _paths(out: Path, name: str) -> dict[str, Path]:
    return {
        "image": out / "images" / f"{name}.mrc",
        "label": out / "labels" / f"{name}.png",
        "instances": out / "instances" / f"{name}.tif",
        "particles": out / "particles" / f"{name}.json",
    }


def _write_mrc(path: Path, data: np.ndarray, pixel_size_nm: float, label: str) -> None:
    import mrcfile

    # mrcfile writes to a path only: a hidden temporary name in the same folder, then a rename,
    # the same scheme as latticewatch.io.atomic.write_atomic.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, np.float32))
            mrc.voxel_size = 10.0 * pixel_size_nm  # Å
            mrc.header.label[0] = label[:80].encode("ascii", "replace")
            mrc.header.nlabl = 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    write_atomic(path, lambda fh: image.save(fh, format="PNG"), fsync=False)


def write_image(out: Path, sim: SimulatedImage) -> dict[str, Any]:
    """Write one image's files; the particles JSON goes last and marks the image complete."""
    import tifffile

    paths = _paths(out, sim.name)
    px = sim.record["pixel_size_nm"]
    crop_rows = []
    for w in sim.crops:
        stem = f"{sim.name}_{w['kind']}{w['number']:02d}"
        r0, c0, r1, c1 = w["window"]
        _write_mrc(out / "crops" / f"{stem}.mrc", sim.counts[r0:r1, c0:c1], px, f"latticewatch simulate {stem}")
        _write_png(out / "crops" / f"{stem}_mask.png", w["mask"])
        crop_rows.append({"crop": f"{stem}.mrc", "mask": f"{stem}_mask.png", "class": w["class"],
                          "instance": w["instance"], "window": w["window"]})
    _write_mrc(paths["image"], sim.counts, px, f"latticewatch simulate {sim.name} seed {sim.record['seed']}")
    _write_png(paths["label"], sim.instances > 0)
    write_atomic(paths["instances"], lambda fh: tifffile.imwrite(fh, sim.instances, photometric="minisblack", compression="zlib"),
                 fsync=False)
    record = dict(sim.record)
    record["crops"] = crop_rows
    record["files"] = {k: str(v.relative_to(out)) for k, v in paths.items()}
    write_atomic(paths["particles"], (json.dumps(record, indent=1, default=_json_default) + "\n").encode(), fsync=False)
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def is_complete(out: Path, name: str, seed: int) -> bool:
    """Whether image ``name`` is fully written (its JSON parses, matches, and names existing files).

    Examples
    --------
    >>> import tempfile
    >>> is_complete(Path(tempfile.mkdtemp()), "sim_000000", 0)
    False
    """
    path = _paths(out, name)["particles"]
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("generator") != GENERATOR or record.get("seed") != seed:
        return False
    files = [out / f for f in record.get("files", {}).values()]
    files += [out / "crops" / c[k] for c in record.get("crops", []) for k in ("crop", "mask")]
    return all(f.is_file() for f in files)


# --------------------------------------------------------------------------------------------
# Dataset


class DatasetMismatch(InputError):
    """An existing dataset directory was made with other settings; the message lists them."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"latticewatch": __version__}
    for pkg in ("abtem", "ase", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def prepare_dataset(out: Path, n: int, seed: int, config: SimulationConfig, *, preset: str = "default",
                    command: str | None = None) -> dict[str, Any]:
    """Create ``out`` (or check that it holds the same dataset) and write ``dataset.json``.

    ``n`` may grow between runs (image ``i`` depends only on the seed and ``i``); everything else
    must match.

    Raises
    ------
    DatasetMismatch
        When ``out/dataset.json`` records another generator, seed or configuration.
    """
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels", "instances", "particles", "crops"):
        (out / sub).mkdir(exist_ok=True)
    meta_path = out / "dataset.json"
    current = {
        "format": DATASET_FORMAT,
        "generator": GENERATOR,
        "seed": int(seed),
        "n": int(n),
        "preset": preset,
        "config": json.loads(config.model_dump_json()),
        "versions": _versions(),
        "command": command,
    }
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError as err:
            raise DatasetMismatch(f"{meta_path} is not valid JSON ({err}); remove it or use another --out") from err
        problems = []
        for key in ("format", "generator", "seed"):
            if old.get(key) != current[key]:
                problems.append(f"{key}: {old.get(key)!r} in the folder, {current[key]!r} now")
        old_config = old.get("config", {})
        for key in sorted(set(old_config) | set(current["config"])):
            if old_config.get(key) != current["config"].get(key):
                problems.append(f"config.{key}: {old_config.get(key)!r} in the folder, {current['config'].get(key)!r} now")
        if problems:
            raise DatasetMismatch(
                f"{out} holds a dataset made with other settings; resume it with the same options, or use another "
                "--out:\n  " + "\n  ".join(problems)
            )
        if old.get("versions") != current["versions"]:
            logger.warning("%s was started with %s, now %s: images may differ in the last bits",
                           out, old.get("versions"), current["versions"])
        current["n"] = max(int(old.get("n", 0)), int(n))
        current["versions"] = old.get("versions", current["versions"])
        current["command"] = old.get("command", command)
    write_atomic(meta_path, (json.dumps(current, indent=2) + "\n").encode())
    return current


def _job(args: tuple[str, int, int, dict]) -> tuple[int, str | None, float]:
    out, seed, index, config_dict = args
    t0 = time.perf_counter()
    try:
        config = SimulationConfig(**config_dict)
        write_image(Path(out), simulate_image(config, seed, index))
        return index, None, time.perf_counter() - t0
    except Exception as err:  # one failed image is reported; the others go on
        logger.exception("image %d failed", index)
        return index, f"{type(err).__name__}: {err}", time.perf_counter() - t0


def _worker_init() -> None:
    # A fresh spawned interpreter: numba is not loaded yet, so its pool can be made one thread
    # wide (numba refuses a changed NUMBA_NUM_THREADS once loaded, hence not in configure_abtem).
    if "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = "1"
    configure_abtem()
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # BLAS/OpenMP pools of numpy and scipy


@dataclass
class DatasetRun:
    """What :func:`simulate_dataset` did."""

    out: Path
    simulated: list[int]
    skipped: list[int]
    failed: dict[int, str]
    seconds: float
    workers: int

    @property
    def seconds_per_image(self) -> float | None:
        """Wall-clock seconds per simulated image (``None`` when none was simulated)."""
        return self.seconds / len(self.simulated) if self.simulated else None


def simulate_dataset(
    out: Path,
    n: int,
    seed: int = 0,
    config: SimulationConfig | None = None,
    *,
    workers: int = 1,
    progress: bool | None = None,
    preset: str = "default",
    command: str | None = None,
) -> DatasetRun:
    """Simulate images ``0 … n-1`` into ``out``, skipping complete ones, then write the card.

    Parameters
    ----------
    out
        Dataset directory (layout: :data:`LAYOUT`).
    n
        Number of images.
    seed
        Dataset seed; image ``i`` depends only on ``(seed, i)``.
    config
        What to simulate (default :class:`SimulationConfig`).
    workers
        Processes (each single-threaded); 1 runs in this process.
    progress
        Show a progress bar (default: when stderr is a terminal).
    preset, command
        Recorded in ``dataset.json``.

    Examples
    --------
    >>> run = simulate_dataset(Path("sim"), 100, seed=1, workers=2)  # doctest: +SKIP
    >>> run.seconds_per_image  # doctest: +SKIP
    """
    config = config or SimulationConfig()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    prepare_dataset(out, n, seed, config, preset=preset, command=command)
    todo = [i for i in range(n) if not is_complete(out, image_name(i), seed)]
    skipped = [i for i in range(n) if i not in set(todo)]
    if skipped:
        logger.info("%d of %d images already complete in %s", len(skipped), n, out)
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    jobs = [(str(out), int(seed), i, config.model_dump()) for i in todo]
    failed: dict[int, str] = {}
    done: list[int] = []
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), desc="simulate", unit="image", disable=not show) as bar:
        if workers == 1 or len(jobs) <= 1:
            from threadpoolctl import threadpool_limits

            configure_abtem()
            with threadpool_limits(limits=1):  # one core, like each worker
                for index, error, _ in map(_job, jobs):
                    (failed.__setitem__(index, error) if error else done.append(index))
                    bar.update()
        else:
            # spawn: fresh interpreters, which load BLAS with one thread and configure abTEM
            # (numba included) in their initializer before anything imports it
            saved = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            os.environ.update({v: "1" for v in saved})
            try:
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
                    for index, error, _ in pool.imap_unordered(_job, jobs):
                        (failed.__setitem__(index, error) if error else done.append(index))
                        bar.update()
            finally:
                for v, old in saved.items():
                    if old is None:
                        os.environ.pop(v, None)
                    else:
                        os.environ[v] = old
    seconds = time.perf_counter() - t0
    write_crop_index(out)
    write_dataset_card(out)
    return DatasetRun(out, sorted(done), skipped, failed, seconds, workers)


def _records(out: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((out / "particles").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable %s: %s", path, err)
    return records


def write_crop_index(out: Path) -> int:
    """Regenerate ``out/crops/index.csv`` from the per-image JSON files; returns its rows.

    Columns: ``crop``, ``mask`` (file names in ``crops/``), ``class``, ``image`` (image stem),
    ``instance`` (0 for bare carbon), ``pixel_size_nm``.
    """
    rows = []
    for rec in _records(out):
        for c in rec.get("crops", []):
            rows.append({"crop": c["crop"], "mask": c["mask"], "class": c["class"], "image": rec["name"],
                         "instance": c["instance"], "pixel_size_nm": f"{rec['pixel_size_nm']:.6f}"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["crop", "mask", "class", "image", "instance", "pixel_size_nm"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "crops" / "index.csv", buf.getvalue().encode(), fsync=False)
    return len(rows)


# --------------------------------------------------------------------------------------------
# Dataset card


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _histogram(values: list[float], edges: list[float], fmt: str = "{:g}") -> str:
    if not values:
        return "(none)"
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    peak = max(int(counts.max()), 1)
    rows = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        bar = "█" * round(30 * c / peak)
        rows.append([f"{fmt.format(lo)}–{fmt.format(hi)}", int(c), bar])
    return _table(["range", "count", ""], rows)


def _quantiles(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "(none)"
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return " / ".join(fmt.format(v) for v in q) + " (min / 25 % / median / 75 % / max)"


def render_dataset_card(out: Path) -> str:
    """The dataset card of ``out`` from its ``dataset.json`` and per-image JSON files."""
    meta = json.loads((out / "dataset.json").read_text())
    records = _records(out)
    particles = [p for r in records for p in r["particles"]]
    members = [m for p in particles for m in p["members"]]
    cfg = meta["config"]

    class_rows = []
    by_class = Counter(p["class"] for p in particles)
    by_class_material = Counter((p["class"], p["material"]) for p in particles)
    materials = sorted({p["material"] for p in particles})
    for c in PARTICLE_CLASSES:
        class_rows.append([c, by_class.get(c, 0)] + [by_class_material.get((c, m), 0) for m in materials])
    empty_images = sum(1 for r in records if r["empty_field"])
    class_rows.append(["empty (images without particles)", empty_images] + ["" for _ in materials])

    crops = Counter(c["class"] for r in records for c in r.get("crops", []))
    defects = Counter(d["type"] for m in members for d in m.get("defects", []))
    shapes = Counter(f"{m['material']} {m['structure']} {m['shape']}" for m in members)
    zones = Counter(str(m.get("zone_axis")) for m in members)
    sizes = [p["equivalent_diameter_nm"] for p in particles]
    member_sizes = [m["size_nm"] for m in members]
    doses = [r["dose_e_per_a2"] for r in records]
    defoci = [r["defocus_nm"] for r in records]
    pixels = [r["pixel_size_nm"] for r in records]
    carbon = [r["conditions"]["carbon"]["thickness_nm"] for r in records]
    seconds = [r.get("seconds", float("nan")) for r in records]
    cpu_seconds = [r.get("cpu_seconds", float("nan")) for r in records]
    detectors = Counter(r["conditions"]["detector"]["mode"] for r in records)

    dose_edges = list(np.geomspace(cfg["dose_e_per_a2"][0], cfg["dose_e_per_a2"][1], 7))
    d_lo, d_hi = cfg["defocus_nm"]
    values = {
        "generator": meta["generator"],
        "seed": meta["seed"],
        "n_requested": meta["n"],
        "n_images": len(records),
        "n_particles": len(particles),
        "preset": meta.get("preset", "default"),
        "command": meta.get("command") or "(not recorded)",
        "versions": ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "size": cfg["size"],
        "mask_radius_nm": MASK_ATOM_RADIUS_NM,
        "closing_nm": MASK_CLOSING_NM,
        "config_json": json.dumps(cfg, indent=2),
        "class_table": _table(["class", "particles"] + materials, class_rows),
        "crop_table": _table(["class", "crops"], [[c, crops.get(c, 0)] for c in CLASSES]),
        "defect_table": _table(["defect", "particles"], sorted(defects.items())) if defects else "(none)",
        "shape_table": _table(["material, structure, shape", "particles"], sorted(shapes.items())) if shapes else "(none)",
        "zone_table": _table(["zone axis", "particles"], sorted(zones.items())) if zones else "(none)",
        "size_hist": _histogram(sizes, list(range(17))),
        "member_size_hist": _histogram(member_sizes, list(range(13))),
        "dose_hist": _histogram(doses, dose_edges, "{:.0f}"),
        "dose_quantiles": _quantiles(doses, "{:.0f}"),
        "defocus_hist": _histogram(defoci, list(np.linspace(d_lo, d_hi, 9)), "{:.0f}"),
        "defocus_quantiles": _quantiles(defoci, "{:.1f}"),
        "pixel_quantiles": _quantiles(pixels, "{:.4f}"),
        "carbon_quantiles": _quantiles(carbon, "{:.2f}"),
        "detector_table": _table(["detector", "images"], sorted(detectors.items())) if detectors else "(none)",
        "seconds_quantiles": _quantiles([s for s in seconds if math.isfinite(s)], "{:.1f}"),
        "cpu_seconds_quantiles": _quantiles([s for s in cpu_seconds if math.isfinite(s)], "{:.1f}"),
        "layout": LAYOUT,
    }
    template = resources.files("latticewatch.training.simulate").joinpath("card.md").read_text(encoding="utf-8")
    return string.Template(template).substitute(values)


def write_dataset_card(out: Path) -> Path:
    """Regenerate ``out/README.md`` (the dataset card) from what is on disk."""
    path = Path(out) / "README.md"
    write_atomic(path, render_dataset_card(Path(out)).encode("utf-8"), fsync=False)
    return path
