"""Fast analytic generator of labelled HRTEM micrographs of nanoparticles on amorphous carbon.

The images are not a multislice simulation; they are built directly in image space, which makes a
512×512 frame cost a few tens of milliseconds on one core and gives exact ground truth:

* **Amorphous carbon** everywhere: white noise filtered in Fourier space by a phase-contrast
  transfer function ``sin χ(k)`` (random defocus and Cs, so the power spectrum shows Thon rings)
  times a temporal-coherence damping envelope, plus a faint long-range thickness variation.
* **Particles**: random convex polygons or ellipses of 2–10 nm equivalent diameter carrying
  lattice fringes ``a·cos(2π g·r + φ)`` of spacing 0.20–0.35 nm. Two crossed sets (with weak
  ``g₁ ± g₂`` cross terms) stand for a particle on zone axis with atomic-column contrast; one set
  for a misoriented particle. Fringe contrast ramps up over a few tenths of a nanometre from the
  edge (thin rims of a rounded particle), and the carbon shows through the particle at reduced
  weight.
* **Weak amplitude contrast**: on average a particle is at most 2.5 % darker (or 0.5 % brighter)
  than the carbon, as in real HRTEM: a global threshold (Otsu on a smoothed frame) reaches a Dice
  of only ~0.2–0.6 on these frames, so a segmenter has to look at the fringes.
* **Shot noise**: ``counts = Poisson(dose · intensity)``, returned as ``uint16``.

Classes (see :data:`latticewatch.frame.CLASSES`):

``no_stacking_fault``
    Two crossed fringe sets, continuous across the particle.
``stacking_fault``
    Two crossed sets; across a plane parallel to the first set's lattice planes the second set
    is shifted by ±2π/3 — the in-plane displacement of an fcc ``ABC→ABA`` fault (``g·b = ±1/3``)
    — so the atomic columns are offset across the fault while the planes parallel to it are not.
``misoriented``
    One fringe set only (planes visible, columns not); in a fifth of the cases very weak.
``agglomeration``
    Two or three convex particles overlapping a little, each with its own lattice; their union is
    **one** instance.
``empty``
    Only for :func:`~.frames.generate_region`: pure carbon, with a blob in ``mask`` standing for a region
    a segmenter found by mistake.

Nyquist: the fringe period is kept at or above :data:`~.crystals.MIN_FRINGE_PERIOD_PX` pixels, so at coarse
pixel sizes the lower end of the spacing range is raised (0.25 nm at 0.1 nm/pixel); pixel sizes
where no spacing of the range survives are refused. Cross terms ``g₁ ± g₂`` above that frequency
are left out instead of aliasing. Particle diameters are capped so one body fits in the image.
See :func:`~.frames.usable_spacing_range_nm`.

Everything is drawn from the ``numpy.random.Generator`` passed in, in a fixed order, so a seed
reproduces an image bit for bit (for a given numpy/scipy).

The modules: :mod:`.frames` (:func:`~.frames.generate_frame`, :func:`~.frames.generate_region`:
placing particles and assembling the frame), :mod:`.crystals` (fringe sets, faults and
agglomerates), :mod:`.shapes` (convex outlines), :mod:`.optics` (lens, dose and the carbon
background) and :mod:`.truth` (the returned frame and its per-particle ground truth).
"""
