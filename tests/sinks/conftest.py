"""Frames and analyses made by hand, for the sinks' tests (no model needed)."""

import numpy as np
import pytest

from latticewatch.frame import Analysis, Frame, Region


def region(i, label, diameter_nm):
    return Region(region_id=i, bbox=(2 * i, 2 * i, 2 * i + 4, 2 * i + 4), centroid_px=(2.0 * i + 2, 2.0 * i + 2),
                  centroid_nm=None, area_px=12, area_nm2=np.pi * diameter_nm**2 / 4, equivalent_diameter_nm=diameter_nm,
                  eccentricity=0.1, solidity=0.9, touches_edge=False, agglomerate_suspect=False, features={},
                  label=label)


def frame_and_analysis(k, labels_diameters, coverage_px=10):
    pixels = np.random.default_rng(k).normal(size=(64, 64)).astype(np.float32)
    mask = np.zeros((64, 64), np.uint8)
    mask.flat[:coverage_px] = 1
    regions = tuple(region(i, lab, d) for i, (lab, d) in enumerate(labels_diameters))
    frame = Frame(f"cam:{k}", pixels, pixel_size_nm=0.05, origin="")
    analysis = Analysis(frame.frame_id, mask, regions, {"segment": 0.01}, {}, "test", 0.05, 0.9)
    return frame, analysis


@pytest.fixture
def analysed():
    """``analysed(k, [(label, diameter_nm), …], coverage_px=10)``: the (frame, analysis) of a 64² frame ``cam:<k>``."""
    return frame_and_analysis
