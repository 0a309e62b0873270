"""``latticewatch calibrate``: settings of a profile and of an instrument, measured on data.

* `threshold` — the decision threshold on the particle probability that maximises the Dice
  pooled over a labelled set, and the classical baselines' parameters fitted once on such a set;
  both are written into the profile's manifest.
* `crystals` — lattice-plane spacings of calibration crystals (Au, Si, CdSe, graphene …).
* `fringes` — the lattice-fringe frequency of an image, from its power spectrum.
* `pixel_size` — the camera's pixel size at a magnification from the fringes of a known crystal,
  written to an instrument calibration TOML (:mod:`latticewatch.calibration`).
* `int8_set` — a small set of model-ready tiles spanning the data, for INT8 calibration.
"""
