"""Classical baselines (Otsu, Fourier annulus, Bragg filter): fitted on real pixels, JSON round trip."""

import json

import numpy as np
import pytest
from skimage.filters import threshold_otsu

from latticewatch.stages.preprocess import normalise, preprocess
from latticewatch.testing.synthetic.frames import generate_frame
from latticewatch.training.assess.baselines import (
    BASELINES,
    BaselineError,
    BraggFilterBaseline,
    FourierAnnulusBaseline,
    OtsuBaseline,
    baseline_from_dict,
    best_threshold,
    make_baseline,
    otsu_threshold,
)
from latticewatch.training.assess.metrics import pooled_dice
from latticewatch.training.data.labelled import group_folds, load_labelled
from shared_data import SHARED_DATA, requires

GRAPHENE = SHARED_DATA / "graphene-contamination"


@pytest.fixture(scope="module")
def analytic():
    """Six training and six test frames of the analytic generator, as the network sees them."""
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(12):
        f = generate_frame(rng, shape=(256, 256), pixel_size_nm=0.05, dose_range=(50.0, 200.0))
        image = preprocess(f.image, 0.05, normalisation="max", model_pixel_size_nm=0.05).image
        frames.append((image, f.mask.astype(bool)))
    return frames[:6], frames[6:]


@pytest.fixture(scope="module")
def fitted(analytic):
    train, _ = analytic
    return {name: make_baseline(name).fit([x for x, _ in train], [m for _, m in train]) for name in BASELINES}


@pytest.mark.parametrize("name", list(BASELINES))
def test_each_baseline_beats_chance_on_analytic_frames(name, analytic, fitted):
    _, test = analytic
    truths = [m for _, m in test]
    dice = pooled_dice([fitted[name].predict(x) for x, _ in test], truths)
    everything = pooled_dice([np.ones_like(m) for m in truths], truths)  # Dice of calling it all particle
    assert dice > everything + 0.15, (dice, everything)
    if name != "otsu":  # the generator's amplitude contrast is deliberately weak; the lattice is not
        assert dice > 0.6
    # particles carry the lattice and are (slightly) dark: the fit has to find that out
    expected = {"otsu": ("foreground", "dark"), "fourier": ("foreground", "lattice"),
                "bragg": ("signal", "lattice")}[name]
    assert getattr(fitted[name], expected[0]) == expected[1]
    assert fitted[name].fitted_images == 6 and 0 < fitted[name].fitted_dice <= 1


@pytest.mark.parametrize("name", list(BASELINES))
def test_fitted_parameters_round_trip_through_json(name, analytic, fitted):
    original = fitted[name]
    text = json.dumps(original.to_dict())
    restored = baseline_from_dict(json.loads(text))
    assert restored == original and type(restored) is type(original)
    image = analytic[1][0][0]
    assert np.array_equal(restored.predict(image), original.predict(image))
    assert json.loads(text)["kind"] == name


def test_polarity_is_learnt_when_the_foreground_is_where_the_lattice_is_missing():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:128, :128]
    images, masks = [], []
    for _ in range(3):
        hole = (yy - rng.uniform(30, 98)) ** 2 + (xx - rng.uniform(30, 98)) ** 2 < rng.uniform(15, 30) ** 2
        lattice = np.cos(2 * np.pi * xx / 5.0) + np.cos(2 * np.pi * (xx * 0.5 + yy * 0.866) / 5.0)
        images.append(np.where(hole, 0.0, lattice) + 0.4 * rng.standard_normal((128, 128)))
        masks.append(hole)
    annulus = FourierAnnulusBaseline().fit(images, masks)
    assert annulus.foreground == "no_lattice" and annulus.k_low < 0.2 < annulus.k_high
    bragg = BraggFilterBaseline().fit(images, masks)
    assert (bragg.signal, bragg.foreground) in {("lattice", "below"), ("residual", "above")}
    assert pooled_dice([bragg.predict(x) for x in images], masks) > 0.8


@requires("graphene-contamination", "images")
def test_bragg_filter_finds_contamination_on_real_graphene_images():
    names = sorted(p.stem for p in (GRAPHENE / "images").glob("*.png"))
    folds = group_folds(names, 4, seed=0)
    train_names, test_names = folds[0][:16], folds[1][:8]

    def prepare(items):
        return [normalise(d.pixels.astype(np.float32), "bezier_zscore") for d in items], [d.mask for d in items]

    train = prepare(load_labelled(GRAPHENE / "images", GRAPHENE / "labels", names=train_names))
    test_images, test_masks = prepare(load_labelled(GRAPHENE / "images", GRAPHENE / "labels", names=test_names))
    bragg = BraggFilterBaseline().fit(*train)
    dice = pooled_dice([bragg.predict(x) for x in test_images], test_masks)
    everything = pooled_dice([np.ones_like(m) for m in test_masks], test_masks)
    assert dice > everything + 0.2, (dice, everything)


def test_otsu_threshold_agrees_with_scikit_image():
    rng = np.random.default_rng(1)
    values = np.r_[rng.normal(0, 1, 5000), rng.normal(5, 1.5, 2000)]
    assert otsu_threshold(values) == pytest.approx(threshold_otsu(values), abs=0.05)
    square = np.ones((32, 32))
    square[8:16, 8:24] = 0.0
    wrong = OtsuBaseline(smoothing_px=0).predict(square) != (square == 0)
    assert wrong.sum() == 4 and wrong[[8, 8, 15, 15], [8, 23, 8, 23]].all()  # the 3×3 median rounds the corners


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(2)
    masks = [rng.random((40, 40)) < 0.3 for _ in range(3)]
    scores = [np.where(m, 1.0, 0.0) + rng.normal(0, 0.6, m.shape) for m in masks]
    t, side, dice = best_threshold(scores, masks)
    assert side == "above"
    assert dice == pytest.approx(pooled_dice([s >= t for s in scores], masks))
    for candidate in np.quantile(np.concatenate([s.ravel() for s in scores]), np.linspace(0.01, 0.99, 37)):
        assert pooled_dice([s >= candidate for s in scores], masks) <= dice + 1e-12
    _, side2, dice2 = best_threshold([-s for s in scores], masks)
    assert side2 == "below" and dice2 == pytest.approx(dice, abs=0.01)


def test_bad_names_and_parameters_are_refused_clearly():
    with pytest.raises(BaselineError, match="unknown baseline 'watershed'"):
        make_baseline("watershed")
    with pytest.raises(BaselineError, match="bragg: aperture"):
        baseline_from_dict({"kind": "bragg", "aperture": -1})
    with pytest.raises(BaselineError, match="otsu: colour"):
        baseline_from_dict({"kind": "otsu", "colour": "red"})
    with pytest.raises(BaselineError, match="holds parameters of kind 'otsu'"):
        baseline_from_dict({"kind": "otsu"}, "bragg")
    with pytest.raises(BaselineError, match="matching, non-empty"):
        OtsuBaseline().fit([], [])
