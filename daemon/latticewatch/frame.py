"""The data that flows through the pipeline: a `Frame` in, an `Analysis` (with `Region` rows) out."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from latticewatch.stages.defect_fraction import DefectConfusion, DefectEstimate, estimate_defect_fraction

#: The five classes of the Groschner et al. (2021) random forest, in the order of its outputs.
CLASSES: tuple[str, ...] = ("stacking_fault", "no_stacking_fault", "misoriented", "agglomeration", "empty")

#: Label of a particle whose largest class probability is below the classifier's ``uncertain_below``.
UNCERTAIN = "uncertain"

#: Frames with a side shorter than this are refused (by the readers, the stream sources and the
#: analyser): they cannot hold a particle at any sensible sampling, and tiny declared sizes are a
#: classic sign of a corrupt header.
MIN_SIDE_PX = 16


def file_safe(text: str) -> str:
    """``text`` with every character that is not safe in a file name replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


@dataclass(frozen=True)
class Frame:
    """One 2-D micrograph as it arrived.

    Parameters
    ----------
    frame_id
        Stable identifier: ``<file>`` for single images, ``<file>#<section>`` for stack sections.
    pixels
        2-D array in the file's own dtype (never rescaled here).
    pixel_size_nm
        Sampling in nm per pixel, or ``None`` when the data truly does not say.
    acquired_at
        Acquisition time when known.
    meta
        Header fields and metadata (mdoc keys, MRC header, TIFF tags …), JSON-serialisable.
    origin
        Where it came from (a path or a stream address).
    """

    frame_id: str
    pixels: np.ndarray
    pixel_size_nm: float | None = None
    acquired_at: datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""

    @property
    def name(self) -> str:
        """A file-name-safe name for output files: the file stem, plus ``_sNNNN`` for a stack section."""
        source, _, section = self.frame_id.partition("#")
        stem = source.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0] or "frame"
        stem = file_safe(stem)
        return f"{stem}_s{int(section):04d}" if section.isdigit() else stem


@dataclass(frozen=True)
class Region:
    """One isolated particle region with its properties in physical units.

    Coordinates are in pixels of the *original* frame; ``*_nm`` fields use the frame's pixel size
    (or are ``None`` when it is unknown).
    """

    region_id: int
    bbox: tuple[int, int, int, int]  # (row0, col0, row1, col1), end exclusive
    centroid_px: tuple[float, float]  # (row, col)
    centroid_nm: tuple[float, float] | None
    area_px: int
    area_nm2: float | None
    equivalent_diameter_nm: float | None
    eccentricity: float
    solidity: float
    touches_edge: bool
    agglomerate_suspect: bool
    features: dict[str, float]
    label: str = "unclassified"
    probabilities: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Analysis:
    """What the pipeline concluded about one frame."""

    frame_id: str
    mask: np.ndarray  # uint8 class map at the frame's original shape: 0 background, 1 particle
    regions: tuple[Region, ...]
    timings_s: dict[str, float]
    model_ids: dict[str, str]
    profile: str
    pixel_size_nm: float | None
    mean_confidence: float
    warnings: tuple[str, ...] = ()
    probability: np.ndarray | None = None  # float32 particle probability at original shape
    # why the model's answer is not to be trusted (whole-frame region, p near 0.5 …); empty when in its domain
    out_of_domain: tuple[str, ...] = ()
    # the classifier's held-out stacking-fault confusion (the manifest's), which corrects the defect fraction
    defect_confusion: DefectConfusion | None = None

    @property
    def coverage(self) -> float:
        """Fraction of the frame's pixels segmented as particle."""
        return float(np.count_nonzero(self.mask)) / self.mask.size

    @property
    def content_ratio(self) -> float:
        """Fraction of the frame's pixels *not* in the foreground class, ``1 − coverage``: for
        the graphene profile (foreground = contamination) the clean-graphene fraction, the part
        of the frame a lattice study can use (Sadre et al. 2021 rank frames by it)."""
        return 1.0 - self.coverage

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(CLASSES, 0)
        for region in self.regions:
            counts[region.label] = counts.get(region.label, 0) + 1
        return counts

    @functools.cached_property
    def defect(self) -> DefectEstimate:
        """The defect fraction, stacking faults among particles on zone axis (fault + no fault) as in the paper,
        corrected for the classifier's confusion, with its 95 % interval (`estimate_defect_fraction`).

        Only particles labelled ``stacking_fault`` or ``no_stacking_fault`` count (not ``uncertain``,
        misoriented, agglomerates, empty); a frame outside the model's domain counts none, so every
        fraction is ``None``.
        """
        counts = {} if self.out_of_domain else self.class_counts()
        return estimate_defect_fraction(counts.get("stacking_fault", 0), counts.get("no_stacking_fault", 0),
                                        self.defect_confusion)

    @property
    def defect_fraction(self) -> float | None:
        """The corrected point estimate of `defect` (``None``: no particle on zone axis, or out of domain)."""
        return self.defect.estimate


@dataclass(frozen=True)
class Rejected:
    """Input that arrived but cannot become a `Frame` (malformed file or message).

    Sources yield it instead of raising, so the runner can quarantine it, publish an error and go on
    with the next frame.
    """

    frame_id: str
    origin: str
    problem: str
    payload: bytes | None = None  # raw stream message, kept in quarantine; None for files (left in place)
    pixels: np.ndarray | None = None  # decoded but refused (non-finite values): the archive keeps them whole
