"""What decides a simulated dataset: the settings (:class:`SimulationConfig`), the presets, the
fixed definition of the particle mask, and the random streams each image draws from.

Image ``i`` of a dataset with seed ``s`` uses ``numpy.random.SeedSequence([s, i])`` only, split by
:func:`image_streams` into independent streams for conditions, scene, carbon, thermal motion,
noise and crops, so an image does not depend on which worker makes it, or when.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from latticewatch.errors import ConfigError
from latticewatch.frame import CLASSES
from latticewatch.training.simulate.structures.stacking import STRUCTURES

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

#: Default class weights: the four particle classes drawn per particle, ``empty`` the fraction of
#: images without particles.
DEFAULT_CLASS_WEIGHTS: dict[str, float] = {
    "stacking_fault": 0.25, "no_stacking_fault": 0.3, "misoriented": 0.25, "agglomeration": 0.2, "empty": 0.05,
}


def _pair(lo_hi: Any) -> tuple[float, float]:
    lo, hi = (float(x) for x in lo_hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"expected (low, high) with low <= high, got {lo_hi!r}")
    return lo, hi


def _check_weights(weights: dict[str, float], known: tuple[str, ...], what: str, plural: str) -> None:
    for name, w in weights.items():
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; {plural} are {', '.join(known)}")
        if not w >= 0:
            raise ValueError(f"weight of {name} must be >= 0, got {w}")


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
    ...     print(err.errors()[0]["msg"])  # doctest: +ELLIPSIS
    Value error, unknown class 'glitter'; classes are stacking_fault, no_stacking_fault, ..., empty
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=64, le=4096, description="image side in pixels")
    pixel_size_nm: tuple[float, float] = (0.02, 0.05)
    materials: dict[str, float] = Field(default_factory=lambda: {"Au": 1.0, "Pd": 1.0, "CdSe": 1.0})
    classes: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_CLASS_WEIGHTS))
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
        _check_weights(v, tuple(STRUCTURES), "material", "materials")
        if not any(w > 0 for w in v.values()):
            raise ValueError("at least one material needs a positive weight")
        return dict(v)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        _check_weights(v, CLASSES, "class", "classes")
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
        raise ConfigError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
    return SimulationConfig(**values)


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


def weighted_choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """One key of ``weights`` drawn with probability proportional to its weight (zero weights never).

    Examples
    --------
    >>> weighted_choice(np.random.default_rng(0), {"counting": 0.0, "integrating": 2.0})
    'integrating'
    """
    names = [k for k, w in weights.items() if w > 0]
    p = np.array([weights[k] for k in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]
