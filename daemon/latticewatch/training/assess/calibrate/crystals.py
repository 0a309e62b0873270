"""Lattice-plane spacings of calibration crystals, for ``latticewatch calibrate pixel-size``.

A magnification is calibrated from the fringes of a crystal whose spacing is known: the table
`CRYSTALS` holds common standards, `d_spacing` gives the spacing of one of their reflections and
refuses the reflections the structure forbids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from latticewatch.calibration import CalibrationError


@dataclass(frozen=True)
class Crystal:
    """Lattice of a calibration standard (room-temperature lattice parameters, nm)."""

    structure: Literal["fcc", "diamond", "wurtzite", "hexagonal2d"]
    a: float
    c: float | None = None
    note: str = ""


#: Calibration crystals. ``latticewatch calibrate pixel-size --material`` accepts these names
#: (case-insensitive); any other crystal works with ``--lattice-nm``.
CRYSTALS: dict[str, Crystal] = {
    "Au": Crystal("fcc", 0.40782, note="gold"),
    "Ag": Crystal("fcc", 0.40853, note="silver"),
    "Pd": Crystal("fcc", 0.38907, note="palladium"),
    "Pt": Crystal("fcc", 0.39242, note="platinum"),
    "Cu": Crystal("fcc", 0.36149, note="copper"),
    "Si": Crystal("diamond", 0.543102, note="silicon"),
    "CdSe": Crystal("wurtzite", 0.4299, 0.7010, note="cadmium selenide, wurtzite"),
    "graphene": Crystal("hexagonal2d", 0.2461, note="graphene / graphite basal plane"),
}


def parse_reflection(text: str) -> tuple[int, ...]:
    """Miller indices from ``"111"``, ``"1-11"``, ``"(2,0,0)"`` or four-index ``"10-10"``.

    >>> parse_reflection("1-11"), parse_reflection("(2, 0, 0)"), parse_reflection("11-20")
    ((1, -1, 1), (2, 0, 0), (1, 1, -2, 0))
    """
    digits = re.findall(r"-?\d+" if "," in text or " " in text.strip() else r"-?\d", text)
    indices = tuple(int(d) for d in digits)
    if len(indices) not in (3, 4) or not any(indices):
        raise CalibrationError(f"reflection {text!r}: give three Miller indices (e.g. 111, 1-11, 2,0,0) "
                               "or four (10-10)")
    return indices


def d_spacing(material: str, reflection: str) -> float:
    """Lattice-plane spacing (nm) of a reflection of a calibration crystal.

    Reflections the structure forbids (e.g. fcc 100, diamond 200, wurtzite 001) are refused:
    they do not show as fringes in a thin crystal, so a measurement would be of something else.

    Examples
    --------
    >>> round(d_spacing("Au", "111"), 4), round(d_spacing("Si", "111"), 4), round(d_spacing("CdSe", "100"), 4)
    (0.2355, 0.3136, 0.3723)
    >>> d_spacing("Au", "100")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    latticewatch.calibration.CalibrationError: Au (100) is a forbidden reflection of fcc; ...: 111, 200, 220, 311, 222
    """
    names = {k.lower(): k for k in CRYSTALS}
    key = names.get(material.lower())
    if key is None:
        raise CalibrationError(f"unknown material {material!r}; known: {', '.join(CRYSTALS)} (or give --lattice-nm)")
    crystal = CRYSTALS[key]
    hkl = parse_reflection(reflection)
    if crystal.structure in ("fcc", "diamond"):
        if len(hkl) != 3:
            raise CalibrationError(f"{key} is cubic: give three Miller indices, not {reflection!r}")
        if not _allowed(crystal.structure, hkl):
            allowed = [f"{h}{k}{ell}" for h, k, ell in _low_index(crystal.structure)]
            raise CalibrationError(f"{key} ({reflection}) is a forbidden reflection of {crystal.structure}; "
                                   f"allowed low-index ones: {', '.join(allowed)}")
        return crystal.a / math.sqrt(sum(i * i for i in hkl))
    if len(hkl) == 4:
        h, k, i, ell = hkl
        if i != -(h + k):
            raise CalibrationError(f"reflection {reflection!r}: in four-index notation i must equal −(h+k)")
    else:
        h, k, ell = hkl
    if crystal.structure == "hexagonal2d":
        if ell:
            raise CalibrationError(f"{key} is a single layer: only (hk0) reflections, not {reflection!r}")
        inverse_d2 = 4 / 3 * (h * h + h * k + k * k) / crystal.a**2
    else:
        if ell % 2 and (h - k) % 3 == 0:
            raise CalibrationError(f"{key} ({reflection}) is forbidden in wurtzite (l odd with h−k = 3n)")
        inverse_d2 = 4 / 3 * (h * h + h * k + k * k) / crystal.a**2 + ell * ell / crystal.c**2
    return 1.0 / math.sqrt(inverse_d2)


def _allowed(structure: str, hkl: tuple[int, ...]) -> bool:
    parity = {i % 2 for i in hkl}
    if len(parity) != 1:
        return False  # fcc: h, k, l unmixed
    return not (structure == "diamond" and parity == {0} and sum(hkl) % 4 == 2)


def _low_index(structure: str) -> list[tuple[int, int, int]]:
    families = [(1, 1, 1), (2, 0, 0), (2, 2, 0), (3, 1, 1), (2, 2, 2), (4, 0, 0)]
    return [f for f in families if _allowed(structure, f)][:5]

