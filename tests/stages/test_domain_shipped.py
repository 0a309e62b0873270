"""The input-statistics domain check with the shipped nanoparticle profile's own reference (``domain.reference``).

The reference was computed by ``latticewatch calibrate domain`` (the command is in ``training.domain_reference``);
these tests hold it to what the README says: real tiles and the demo's abTEM frames pass, a constant frame and a
real tile declared at 4× its pixel size are flagged because their model input looks unlike training.
"""

from pathlib import Path

import numpy as np
import pytest

import latticewatch.testing
from latticewatch.frame import Frame
from latticewatch.io.readers import read_frames
from latticewatch.runtime.analyser import Analyser
from shared_data import SHARED_DATA, requires

REAL = SHARED_DATA / "real-nanoparticles" / "images"
DEMO = Path(latticewatch.testing.__file__).parent / "demo_frames" / "images"
UNLIKE = "input statistics unlike training: distance "


@pytest.fixture(scope="module")
def shipped():
    return Analyser("nanoparticles", threads=1)


def test_the_shipped_profile_has_the_reference_its_manifest_says_it_computed(shipped):
    reference = shipped.manifest.domain.reference
    recorded = shipped.manifest.training["domain_reference"]
    assert reference is not None and recorded.command.startswith("latticewatch calibrate domain ")
    assert reference.n_frames == recorded.metrics["n_frames"]
    assert reference.limit == pytest.approx(recorded.metrics["limit"])
    assert reference.limit == pytest.approx(recorded.metrics["margin"] * recorded.metrics["loo_max"], rel=1e-3)


def test_the_demo_frames_are_not_flagged(shipped):
    paths = sorted(DEMO.glob("*.tif"))
    assert len(paths) == 12
    for path in paths:
        [frame] = read_frames(path)
        assert shipped.analyse(frame).out_of_domain == (), path.name


@requires("real-nanoparticles", "images")
def test_the_real_tiles_are_not_flagged(shipped):
    paths = sorted(REAL.glob("*.mrc"))
    assert len(paths) == 15
    for path in paths:
        [frame] = read_frames(path)
        assert shipped.analyse(frame).out_of_domain == (), path.name


@requires("real-nanoparticles", "images")
def test_a_real_tile_declared_at_four_times_its_pixel_size_is_flagged(shipped):
    [frame] = read_frames(REAL / "gen_Au2p2nm_c30_r1.mrc")  # almost only carbon: particles cannot give it away
    assert frame.pixel_size_nm == pytest.approx(0.05) and shipped.analyse(frame).out_of_domain == ()
    reasons = shipped.analyse(Frame("told-0.2", frame.pixels, 0.2)).out_of_domain
    assert any(r.startswith(UNLIKE) for r in reasons), reasons


def test_a_constant_frame_is_flagged_for_its_input_statistics(shipped):
    reasons = shipped.analyse(Frame("constant", np.full((256, 256), 1000, np.uint16), 0.05)).out_of_domain
    assert any(r.startswith(UNLIKE) for r in reasons), reasons
