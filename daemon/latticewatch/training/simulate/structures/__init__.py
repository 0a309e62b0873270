"""Atomic models for the multislice simulator: nanoparticles with planted planar defects, and
amorphous carbon.

Every builder is a pure function of its arguments and a ``numpy.random.Generator``; nothing here
touches abTEM, so models can be built and checked without it (``ase`` is needed for the fcc shape
templates and the multiply twinned particles).

- :mod:`.stacking`: close-packed lattices (Au, Pd, CdSe), stacking sequences with planted
  planar defects, and the layer sites they put in space;
- :mod:`.shapes`: convex bodies (ase.cluster polyhedra, ellipsoids, prisms) to carve them;
- :mod:`.orientation`: rotations on or off a zone axis;
- :mod:`.particles`: single crystals (perfect or faulted) and multiply twinned particles;
- :mod:`.carbon`: the amorphous carbon film.
"""
