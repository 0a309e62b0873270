"""The overlay's colours: every label its own, `uncertain` grey and apart from `unclassified`, and in the legend."""

import numpy as np

from latticewatch.frame import CLASSES, UNCERTAIN, Analysis, Frame, Region
from latticewatch.sinks.reports import CLASS_COLOURS, overlay_image


def _overlay(labels):
    mask = np.zeros((256, 256), np.uint8)
    regions = []
    for i, label in enumerate(labels):
        r0 = c0 = 120 + 60 * i
        mask[r0 : r0 + 20, c0 : c0 + 20] = 1
        regions.append(Region(region_id=i, bbox=(r0, c0, r0 + 20, c0 + 20), centroid_px=(r0 + 9.5, c0 + 9.5),
                              centroid_nm=None, area_px=400, area_nm2=1.0, equivalent_diameter_nm=1.1,
                              eccentricity=0.0, solidity=1.0, touches_edge=False, agglomerate_suspect=False,
                              features={}, label=label))
    frame = Frame("f", np.zeros((256, 256), np.uint16), 0.05)  # flat: the frame renders black
    analysis = Analysis("f", mask, tuple(regions), {}, {}, "test", 0.05, 0.9)
    return np.asarray(overlay_image(frame, analysis))


def test_every_label_has_its_own_colour_and_uncertain_is_grey():
    colours = [CLASS_COLOURS[name] for name in (*CLASSES, UNCERTAIN, "unclassified")]
    assert len(set(colours)) == len(colours)
    r, g, b = CLASS_COLOURS[UNCERTAIN]
    assert r == g == b


def test_an_uncertain_particle_is_outlined_grey_and_listed_in_the_legend():
    rgb = _overlay([UNCERTAIN, "unclassified"])
    assert tuple(rgb[120, 130]) == CLASS_COLOURS[UNCERTAIN]  # top edge of the first region
    assert tuple(rgb[180, 190]) == CLASS_COLOURS["unclassified"]
    assert rgb.shape[1] > 256 and not rgb[:, 256:].any(axis=2)[:, :4].any()  # the legend is a panel right of the frame
    swatches = {tuple(p) for p in rgb[:, 256 + 14]}  # the legend's colour boxes
    assert CLASS_COLOURS[UNCERTAIN] in swatches and CLASS_COLOURS["stacking_fault"] in swatches

    without = _overlay(["stacking_fault"])
    assert CLASS_COLOURS[UNCERTAIN] not in {tuple(p) for p in without[:, 256 + 14]}  # no uncertain particle, no row
