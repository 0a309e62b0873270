"""One simulated micrograph, from its seed to counts and truth (:func:`simulate_image`).

The steps, each in its module: conditions (:mod:`.optics`), scene and cell (:mod:`.scene`),
exit wave and image (:mod:`.multislice`), detector (:mod:`.optics`), ground truth
(:mod:`.truth`). The result is a pure function of the configuration, the dataset seed and the
image index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from latticewatch.training.simulate.config import MASK_ATOM_RADIUS_NM, MASK_CLOSING_NM, SimulationConfig, image_streams
from latticewatch.training.simulate.multislice import exit_wave, image_intensity
from latticewatch.training.simulate.optics import detect, draw_conditions
from latticewatch.training.simulate.scene import build_cell, compose_scene
from latticewatch.training.simulate.truth import crop_windows, particle_records, rasterise

#: Identifies the image model; a dataset written by another generator is not resumed.
GENERATOR = "latticewatch.abtem/1"
#: Format of the per-image JSON files.
IMAGE_FORMAT = "latticewatch.simulate.image/1"


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
    counts, _ = detect(intensity, sim["oversampling"], conditions["dose_e_per_px"], conditions["detector"],
                       rngs["noise"])
    shape = (config.size, config.size)
    instances = rasterise(scene, cell, conditions, shape)
    sim.update({"cell_angstrom": list(cell.size), "n_slices": len(cell.slices),
                "slice_thickness_angstrom": cell.slices[0], "n_atoms": len(cell.symbols)})
    conditions["carbon"]["n_atoms"] = cell.n_carbon
    particles = particle_records(scene, conditions, instances)
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
    crops = crop_windows(rngs["crops"], config, instances, particles, conditions)
    record["seconds"] = time.perf_counter() - t0  # wall clock, as the worker saw it
    record["cpu_seconds"] = time.process_time() - cpu0  # what it cost, whatever else ran
    return SimulatedImage(name, counts, instances, record, crops)


