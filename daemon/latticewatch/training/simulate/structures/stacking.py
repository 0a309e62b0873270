"""Close-packed stackings: the lattices, their stacking sequences with planted planar defects,
and the layer sites a sequence puts in space.

fcc metals (Au, Pd) and CdSe in both its polytypes are stackings of close-packed layers: fcc and
zinc blende repeat ``ABC``, wurtzite repeats ``AB`` (for CdSe a "layer" is a Cd–Se pair, the Se
3/4 of a layer spacing above its Cd, which gives the tetrahedral bond along the stacking axis).
:func:`stacking_sequence` writes the registry of each layer (0 = A, 1 = B, 2 = C); a planar
defect is a rule change at one layer:

* ``intrinsic`` (fcc, zinc blende): one layer missing, ``ABCA|CABC``;
* ``extrinsic``: one layer inserted, ``ABCAB|A|CABC``;
* ``twin``: the sequence mirrored from then on, ``ABCA|CBA`` (the mirror plane is the layer
  before the break);
* ``I1`` / ``I2`` (wurtzite): the basal faults with one and two cubic layers, ``ABAB|CBCB`` and
  ``ABAB|CACA``.

:func:`stacked_crystal` turns the sequence into atoms (the particle shape is then carved from
them, :mod:`latticewatch.training.simulate.structures.particles`). The stacking frame has ``z``
along the stacking normal (fcc ``[111]``, wurtzite ``[0001]``) and ``x`` along a close-packed row
(fcc ``[1-10]``, wurtzite ``[2-1-10]``). Viewing along ``x`` is the zone axis on which the
close-packed planes, and so every planted fault, are edge-on: fcc ``<110>`` and wurtzite
``<11-20>``. :func:`layer_registry` reads the stacking back from the atoms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Lattice:
    """A close-packed stacking: layer geometry and the atoms of one layer site.

    Attributes
    ----------
    material
        ``"Au"``, ``"Pd"`` or ``"CdSe"``.
    structure
        ``"fcc"``, ``"zincblende"`` or ``"wurtzite"``.
    a_nn
        Nearest-neighbour distance within a layer (Å).
    layer_spacing
        Distance between successive layers (Å).
    basis
        ``(symbol, height)`` of the atoms on one layer site, height in units of the layer spacing.
    lattice_constant
        Cubic lattice constant (fcc, zinc blende) or ``a`` (wurtzite), Å.
    """

    material: str
    structure: str
    a_nn: float
    layer_spacing: float
    basis: tuple[tuple[str, float], ...]
    lattice_constant: float

    @property
    def period(self) -> int:
        """Layers in one repeat of the perfect stacking (3 for ABC, 2 for AB)."""
        return 2 if self.structure == "wurtzite" else 3


def _cubic(material: str, structure: str, a: float, basis) -> Lattice:
    return Lattice(material, structure, a / math.sqrt(2.0), a / math.sqrt(3.0), basis, a)


#: Lattices by (material, structure). Room-temperature lattice constants: Au 4.078 Å, Pd 3.891 Å,
#: zinc-blende CdSe 6.077 Å, wurtzite CdSe a = 4.30 Å, c = 7.01 Å with u = 3/8 (Se 3/4 of a
#: layer above Cd: the Cd–Se bond along c is 2.63 Å in both polytypes).
LATTICES: dict[tuple[str, str], Lattice] = {
    ("Au", "fcc"): _cubic("Au", "fcc", 4.078, (("Au", 0.0),)),
    ("Pd", "fcc"): _cubic("Pd", "fcc", 3.891, (("Pd", 0.0),)),
    ("CdSe", "zincblende"): _cubic("CdSe", "zincblende", 6.077, (("Cd", 0.0), ("Se", 0.75))),
    ("CdSe", "wurtzite"): Lattice("CdSe", "wurtzite", 4.30, 7.01 / 2.0, (("Cd", 0.0), ("Se", 0.75)), 4.30),
}

#: Structures of each material.
STRUCTURES: dict[str, tuple[str, ...]] = {"Au": ("fcc",), "Pd": ("fcc",), "CdSe": ("wurtzite", "zincblende")}
#: Planar defects that can be planted, by structure.
DEFECTS: dict[str, tuple[str, ...]] = {
    "fcc": ("intrinsic", "extrinsic", "twin"),
    "zincblende": ("intrinsic", "extrinsic", "twin"),
    "wurtzite": ("I1", "I2"),
}

#: Rows: the stacking-frame axes x = [1-10], y = [11-2], z = [111] in cubic coordinates, so that
#: ``local = CUBIC_TO_STACKING @ cubic``.
CUBIC_TO_STACKING = np.array(
    [[1.0, -1.0, 0.0], [1.0, 1.0, -2.0], [1.0, 1.0, 1.0]]
) / np.array([[math.sqrt(2.0)], [math.sqrt(6.0)], [math.sqrt(3.0)]])


def stacking_sequence(
    structure: str,
    n_layers: int,
    defects: dict[int, str] | None = None,
    *,
    start: int = 0,
    direction: int = 1,
) -> np.ndarray:
    """Registry (0 = A, 1 = B, 2 = C) of ``n_layers`` close-packed layers.

    Parameters
    ----------
    structure
        ``"fcc"`` or ``"zincblende"`` (perfect ``ABC``) or ``"wurtzite"`` (perfect ``AB``).
    n_layers
        Number of layers.
    defects
        ``{layer: kind}``: the first layer whose registry breaks the perfect continuation, and
        the kind of defect (see :data:`DEFECTS`). Layers must be at least 2 (a break needs two
        layers of history); an ``extrinsic`` fault or ``I2`` also sets the layer after it.
    start, direction
        Registry of layer 0 and the step to layer 1 (+1 for ``ABC…``, −1 for ``ACB…``).

    Returns
    -------
    numpy.ndarray
        ``int8`` registry of each layer; neighbouring layers always differ.

    Examples
    --------
    >>> letters = lambda s: "".join("ABC"[i] for i in s)
    >>> letters(stacking_sequence("fcc", 8))
    'ABCABCAB'
    >>> letters(stacking_sequence("fcc", 8, {4: "intrinsic"}))
    'ABCACABC'
    >>> letters(stacking_sequence("fcc", 8, {4: "extrinsic"}))
    'ABCACBCA'
    >>> letters(stacking_sequence("fcc", 8, {4: "twin"}))
    'ABCACBAC'
    >>> letters(stacking_sequence("wurtzite", 8, {4: "I1"}))
    'ABABCBCB'
    >>> letters(stacking_sequence("wurtzite", 8, {4: "I2"}))
    'ABABCACA'
    """
    defects = _checked_defects(structure, n_layers, defects, direction)
    seq = np.zeros(max(n_layers, 2), np.int8)
    seq[0], seq[1] = start % 3, (start + direction) % 3
    delta = direction
    forced: dict[int, int] = {}
    for k in range(2, n_layers):
        kind = defects.get(k)
        prev, prev2 = int(seq[k - 1]), int(seq[k - 2])
        third = 3 - prev - prev2  # the one registry that is neither of the last two
        if k in forced:
            s = forced[k]
        elif structure == "wurtzite":
            if kind == "I2":
                forced[k + 1] = 3 - third - prev
            s = third if kind in ("I1", "I2") else prev2
        elif kind == "twin":
            delta = -delta
            s = prev + delta  # == prev2: the previous layer is the mirror plane
        elif kind == "intrinsic":
            s = prev - delta  # one layer of the perfect sequence left out
        elif kind == "extrinsic":
            s = prev - delta  # an extra layer, then the perfect sequence resumes one step back
            forced[k + 1] = (s - delta) % 3
        elif structure == "wurtzite":
            s = prev2
        else:
            s = prev + delta
        seq[k] = s % 3
    return seq[:n_layers]


def _checked_defects(structure: str, n_layers: int, defects: dict[int, str] | None, direction: int) -> dict[int, str]:
    """The arguments of :func:`stacking_sequence`, checked; returns a copy of ``defects``."""
    if structure not in DEFECTS:
        raise ValueError(f"structure must be one of {tuple(DEFECTS)}, got {structure!r}")
    defects = dict(defects or {})
    for layer, kind in defects.items():
        if kind not in DEFECTS[structure]:
            raise ValueError(f"{structure} takes defects {DEFECTS[structure]}, got {kind!r}")
        if not 2 <= layer < n_layers:
            raise ValueError(f"a defect needs 2 <= layer < {n_layers}, got {layer}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    return defects


def letters(sequence) -> str:
    """``"ABC…"`` spelling of a registry sequence.

    Examples
    --------
    >>> letters([0, 1, 2, 0])
    'ABCA'
    """
    return "".join("ABC"[int(s)] for s in sequence)


def stacking_environments(sequence) -> str:
    """``h``/``c`` environment of each inner layer (hexagonal when both neighbours coincide).

    Examples
    --------
    >>> stacking_environments(stacking_sequence("fcc", 6, {3: "twin"}))
    'chcc'
    """
    s = np.asarray(sequence)
    return "".join("h" if a == b else "c" for a, b in zip(s[:-2], s[2:]))


def stacked_crystal(
    lattice: Lattice, sequence, first_layer: int, half_width: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Layer sites of a stacking over a square of ``2·half_width`` (Å) in the stacking frame.

    Layer ``first_layer + i`` has registry ``sequence[i]`` and its sites at height
    ``(first_layer + i)·layer_spacing``; within a layer the sites form a triangular lattice
    with a row along ``x``, shifted by ``registry·(a_nn/2, a_nn·√3/6)``.

    Parameters
    ----------
    lattice
        The stacking geometry.
    sequence
        Registry of each layer (see :func:`stacking_sequence`).
    first_layer
        Index of the first layer (sets its height).
    half_width
        Half the side of the square the sites cover in ``x`` and ``y``.

    Returns
    -------
    sites, layer_index, registry
        ``(n, 3)`` site positions (Å) and, for each, its layer index and registry.

    Examples
    --------
    >>> lat = LATTICES["Au", "fcc"]
    >>> sites, layers, reg = stacked_crystal(lat, [0, 1, 2], 0, 5.0)
    >>> sorted(set(layers.tolist())), round(float(sites[layers == 1, 2][0]), 3)
    ([0, 1, 2], 2.354)
    """
    a = lattice.a_nn
    row = a * math.sqrt(3.0) / 2.0
    nj = math.ceil(half_width / row) + 2
    ni = math.ceil(half_width / a) + nj + 2
    i, j = np.meshgrid(np.arange(-ni, ni + 1), np.arange(-nj, nj + 1), indexing="ij")
    base = np.stack([(i + 0.5 * j).ravel() * a, j.ravel() * row], axis=1)
    base = base[(np.abs(base[:, 0]) <= half_width + a) & (np.abs(base[:, 1]) <= half_width + a)]
    registry = np.asarray(sequence, np.int64)
    shift = np.array([0.5 * a, a * math.sqrt(3.0) / 6.0])
    n_layers = len(registry)
    xy = (base[None, :, :] + registry[:, None, None] * shift).reshape(-1, 2)
    layer = np.repeat(np.arange(first_layer, first_layer + n_layers), len(base))
    z = layer * lattice.layer_spacing
    return np.column_stack([xy, z]), layer, np.repeat(registry, len(base))


def layer_registry(local_positions: np.ndarray, lattice: Lattice) -> tuple[np.ndarray, np.ndarray]:
    """Read the stacking back from site positions in the stacking frame.

    Atoms are sorted into layers by height and each layer's registry is its ``y`` offset in
    units of ``a_nn·√3/6`` modulo 3 (rows repeat every ``a_nn·√3/2``).

    Parameters
    ----------
    local_positions
        ``(n, 3)`` positions of the *first* basis atom of each site (e.g. only Cd for CdSe), in
        the stacking frame, as built (small displacements, e.g. thermal, are tolerated).
    lattice
        The stacking geometry.

    Returns
    -------
    layers, registry
        Layer indices present (ascending) and the registry of each.

    Raises
    ------
    ValueError
        When the atoms of a layer do not share one registry (not a close-packed stacking).

    Examples
    --------
    >>> lat = LATTICES["Pd", "fcc"]
    >>> sites, _, _ = stacked_crystal(lat, stacking_sequence("fcc", 6, {3: "twin"}), 0, 6.0)
    >>> letters(layer_registry(sites, lat)[1])
    'ABCBAC'
    """
    z = np.round(local_positions[:, 2] / lattice.layer_spacing).astype(np.int64)
    unit = lattice.a_nn * math.sqrt(3.0) / 6.0
    reg = np.round(local_positions[:, 1] / unit).astype(np.int64) % 3
    layers = np.unique(z)
    out = np.empty(len(layers), np.int8)
    for n, k in enumerate(layers):
        values = np.unique(reg[z == k])
        if len(values) != 1:
            raise ValueError(f"layer {k} mixes registries {values.tolist()}: not a close-packed stacking")
        out[n] = values[0]
    return layers, out


