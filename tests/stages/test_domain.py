"""The input-statistics part of the domain check, on arrays: the descriptor, the reference, the reason."""

import numpy as np
import pytest

from latticewatch.stages.domain import DESCRIPTOR_FEATURES, DomainRules, InputReference, input_descriptor, out_of_domain
from latticewatch.stages.preprocess import preprocess
from latticewatch.testing.synthetic.frames import generate_frame
from latticewatch.training.assess.calibrate.domain import fit_reference, leave_one_out_distances


def _model_input(pixels, pixel_size_nm):
    return preprocess(pixels, pixel_size_nm, normalisation="zscore", model_pixel_size_nm=0.05).image


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(1000)
    x = np.array([input_descriptor(_model_input(generate_frame(rng, (256, 256), 0.05).image, 0.05))
                  for _ in range(20)])
    mean, cov = fit_reference(x)
    limit = 2.0 * leave_one_out_distances(x).max()
    return InputReference(mean=tuple(mean), covariance=tuple(map(tuple, cov)), limit=limit, n_frames=len(x))


def test_descriptor_has_its_named_features_and_ignores_contrast():
    image = _model_input(generate_frame(np.random.default_rng(0), (256, 256), 0.05).image, 0.05)
    d = input_descriptor(image)
    assert d.shape == (len(DESCRIPTOR_FEATURES),) and np.all(np.isfinite(d))
    np.testing.assert_allclose(input_descriptor(3 * image + 7), d, atol=1e-4)
    assert np.all(np.isfinite(input_descriptor(np.zeros((20, 20), np.float32))))  # tiny and constant frames


def test_a_frame_at_a_wrong_scale_and_a_constant_frame_are_flagged_and_a_new_training_like_frame_is_not(reference):
    rules = DomainRules(reference=reference)
    p, labels = np.zeros((64, 64), np.float32), np.zeros((64, 64), np.int32)
    rng = np.random.default_rng(7)
    for _ in range(3):
        assert out_of_domain(p, labels, rules, _model_input(generate_frame(rng, (384, 384), 0.05).image, 0.05)) == ()
    carbon = generate_frame(rng, (512, 512), 0.05, n_particles=0).image
    reasons = out_of_domain(p, labels, rules, _model_input(carbon, 0.2))  # told 0.2 nm/px: upsampled 4×
    assert reasons and reasons[0].startswith("input statistics unlike training: distance ")
    assert out_of_domain(p, labels, rules, np.zeros((128, 128), np.float32))
    assert out_of_domain(p, labels, DomainRules(), np.zeros((128, 128), np.float32)) == ()  # no reference: off


def test_a_reference_must_match_its_features():
    with pytest.raises(ValueError, match="one per feature"):
        InputReference(mean=(0.0,), covariance=((1.0,),), limit=1.0, n_frames=3)
