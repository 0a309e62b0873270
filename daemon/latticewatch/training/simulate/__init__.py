"""Physics-based training data: HRTEM of nanoparticles on amorphous carbon by abTEM multislice.

``latticewatch simulate`` writes one dataset directory (layout in
:data:`~latticewatch.training.simulate.output.LAYOUT`): the scenes are composed, abTEM computes
the images, the ground truth is rasterised from the atoms, and the dataset is written, resumed
and summarised. The fast analytic generator (:mod:`latticewatch.testing.synthetic`) stays for
tests and the demo.

The modules, in the order an image passes through them
------------------------------------------------------
- :mod:`.config`: the settings (:class:`~.config.SimulationConfig`), presets, the mask
  definition and the random streams of each image;
- :mod:`.structures`: atomic models (crystals with planted defects, twinned particles, carbon);
- :mod:`.optics`: the imaging conditions drawn per image, and the detector;
- :mod:`.scene`: particles placed on the field of view and stacked on the carbon film;
- :mod:`.multislice`: the abTEM exit wave and the lens (abTEM imported lazily);
- :mod:`.truth`: instance map, per-particle records and classifier crop windows;
- :mod:`.image`: one image, from its seed to counts and truth (:func:`~.image.simulate_image`);
- :mod:`.output`: the dataset directory, written atomically and resumable;
- :mod:`.dataset`: the whole run over worker processes (:func:`~.dataset.simulate_dataset`);
- :mod:`.card`: the dataset card (``card.md`` filled in).

One image, step by step
-----------------------
1. **Conditions** (:func:`~.optics.draw_conditions`): pixel size, 300 kV, defocus, residual
   aberrations (A1, B2, A2, Cs, C5), focal spread, illumination convergence, dose, detector,
   carbon thickness, which side of the film the particles sit on.
2. **Scene** (:func:`~.scene.compose_scene`, :func:`~.scene.build_cell`): 1–N particles placed
   inside the field of view, at least ``min_gap_nm`` apart in projection so the binary mask keeps
   them apart, except the members of an agglomerate, which touch and form one instance. Every
   particle rests on the carbon film; thermal displacements are added to the particle atoms.
3. **Exit wave** (:func:`~.multislice.exit_wave`): plane-wave multislice through the periodic
   cell, sampled ``f >= 2`` times finer than the detector.
4. **Image** (:func:`~.multislice.image_intensity`): the objective lens at ``focal_nodes``
   Gauss–Hermite defoci of the focal spread, intensities summed with their weights (incoherent
   focal integration).
5. **Detector** (:func:`~.optics.detect`): pixel integration, MTF blur and Poisson counts, in
   the order of a ``counting`` or an ``integrating`` camera.
6. **Ground truth** (:func:`~.truth.rasterise`): the projected footprint of each particle's
   atoms; lens delocalisation outside the particle is deliberately not in the mask.

Reproducibility
---------------
Image ``i`` of a dataset with seed ``s`` uses ``numpy.random.SeedSequence([s, i])`` only, split
into independent streams for conditions, scene, carbon, thermal motion, noise and crops; FFTs
are numpy's (pocketfft, deterministic), abTEM and numba run single-threaded. The same seed
therefore gives the same images whatever ``--workers`` and however often a run is resumed
(for the same versions of numpy, abTEM and ase, which ``dataset.json`` records).
"""
