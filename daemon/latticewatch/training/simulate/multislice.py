"""abTEM: the exit wave of the multislice cell and the image the objective lens makes of it.

abTEM (the ``[simulate]`` extra) is imported inside the functions, so the rest of the simulator,
and ``latticewatch --help``, work without it.

:func:`exit_wave`: abTEM ``Potential`` (independent-atom model, Lobato parametrisation, infinite
projection within a slice) on a periodic cell of the field of view, sampled ``f`` times finer
than the detector (``f >= 2``, sampling at most ``max_sim_sampling_angstrom``), sliced every
``slice_thickness_angstrom``; plane-wave multislice with abTEM's 2/3 antialiasing aperture.

:func:`image_intensity`: the objective lens (abTEM ``CTF``: aberrations and the
spatial-coherence envelope of the illumination convergence) is applied to the exit wave at
``focal_nodes`` Gauss–Hermite defoci of the focal spread and the intensities are summed with
their weights. This incoherent focal integration is the correct treatment of partial temporal
coherence for a strong scatterer; the quasi-coherent envelope (``focal_spread`` in abTEM's CTF)
is only valid for weak objects, and the extra cost (two FFTs per node) is small next to the
multislice.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from latticewatch.training.simulate.scene import Cell


@functools.cache  # once per process: the settings are global to abTEM, dask and numba
def configure_abtem() -> None:
    """Set abTEM for deterministic single-threaded use: numpy FFT, eager evaluation, synchronous
    dask, one numba thread.

    Raises
    ------
    ImportError
        When abTEM is not installed (the ``[simulate]`` extra).
    """
    import abtem
    import dask
    import numba

    # numpy's pocketfft gives the same bits every run; FFTW plans measured at run time need not.
    abtem.config.set({"device": "cpu", "fft": "numpy", "dask.lazy": False, "diagnostics.progress_bar": False})
    dask.config.set(scheduler="synchronous")
    numba.set_num_threads(1)


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
        weighted = intensity * (w / math.sqrt(math.pi))
        total = weighted if total is None else total + weighted
    return total


