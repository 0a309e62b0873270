"""The defect-fraction estimator: corrected for the classifier's confusion, and an interval that covers the truth."""

import numpy as np
import pydantic
import pytest
from scipy import stats

from latticewatch.stages.defect_fraction import DefectConfusion, estimate_defect_fraction

#: A mediocre classifier, measured on 150 held-out particles of each class.
MEDIOCRE = DefectConfusion(true_stacking_fault=(128, 22), true_no_stacking_fault=(15, 135))


def confusion_measured(rng, sensitivity, specificity, held_out):
    """What a trainer would record: a classifier with this true confusion scored on ``held_out`` particles a class."""
    tp, tn = rng.binomial(held_out, sensitivity), rng.binomial(held_out, specificity)
    return DefectConfusion(true_stacking_fault=(tp, held_out - tp), true_no_stacking_fault=(held_out - tn, tn))


def labelled(rng, truth, sensitivity, specificity, particles):
    """Counts the classifier gives for ``particles`` zone-axis particles of which a fraction ``truth`` is faulted."""
    faulted = rng.binomial(particles, truth)
    n_sf = rng.binomial(faulted, sensitivity) + rng.binomial(particles - faulted, 1 - specificity)
    return n_sf, particles - n_sf


@pytest.mark.parametrize(("truth", "sensitivity", "specificity", "held_out", "particles"), [
    (0.3, 0.85, 0.9, 150, 12),     # one frame, a mediocre classifier
    (0.3, 0.85, 0.9, 150, 800),    # a rolling window of frames: the confusion's uncertainty dominates
    (0.05, 0.95, 0.97, 400, 60),   # near the lower bound
    (0.8, 0.7, 0.75, 60, 200),     # a poor classifier measured on few particles
])
def test_the_interval_covers_the_truth_in_at_least_90_percent_of_trials(truth, sensitivity, specificity, held_out,
                                                                        particles):
    rng = np.random.default_rng(13)
    hits, estimates, raws = 0, [], []
    for _ in range(300):
        confusion = confusion_measured(rng, sensitivity, specificity, held_out)
        e = estimate_defect_fraction(*labelled(rng, truth, sensitivity, specificity, particles), confusion)
        hits += e.lower <= truth <= e.upper
        estimates.append(e.estimate)
        raws.append(e.raw)
    assert hits / 300 >= 0.9
    if particles >= 200:  # enough particles for the correction to show: it removes the classifier's bias
        assert abs(np.mean(estimates) - truth) < 0.02 < abs(np.mean(raws) - truth)


def test_a_rolling_series_is_within_005_of_the_truth_and_covered():
    """The issue's goal: 100 frames of ~8 zone-axis particles, pooled, with a confusion measured on 300 + 300."""
    rng = np.random.default_rng(7)
    within = covered = 0
    for _ in range(100):
        confusion = confusion_measured(rng, 0.92, 0.94, 300)
        counts = np.array([labelled(rng, 0.25, 0.92, 0.94, rng.poisson(8)) for _ in range(100)]).sum(axis=0)
        e = estimate_defect_fraction(int(counts[0]), int(counts[1]), confusion)
        within += abs(e.estimate - 0.25) <= 0.05
        covered += e.lower <= 0.25 <= e.upper
    assert within >= 90 and covered >= 90


#: A classifier that labels 20 % of true faults another class or uncertain, and 2 % of fault-free particles.
ABSTAINING = ((0.70, 0.10, 0.20), (0.08, 0.90, 0.02))


def labelled_abstaining(rng, truth, particles):
    """Counts labelled SF and no-SF by the `ABSTAINING` classifier; the particles it abstains on are not counted."""
    faulted = rng.binomial(particles, truth)
    counts = rng.multinomial(faulted, ABSTAINING[0]) + rng.multinomial(particles - faulted, ABSTAINING[1])
    return int(counts[0]), int(counts[1])


@pytest.mark.parametrize("truth", [0.15, 0.5, 0.8])
def test_differential_abstention_is_corrected_without_bias(truth):
    rng = np.random.default_rng(31)
    exact = DefectConfusion(true_stacking_fault=(7000, 1000, 2000), true_no_stacking_fault=(800, 9000, 200))
    # what the two-column correction saw: the same labels, the abstentions dropped
    two_column = DefectConfusion(true_stacking_fault=(7000, 1000), true_no_stacking_fault=(800, 9000))
    corrected, ignoring = [], []
    for _ in range(400):
        counts = labelled_abstaining(rng, truth, 500)
        corrected.append(estimate_defect_fraction(*counts, exact).estimate)
        ignoring.append(estimate_defect_fraction(*counts, two_column).estimate)
    assert abs(np.mean(corrected) - truth) < 0.01 < 0.02 < abs(np.mean(ignoring) - truth)


@pytest.mark.parametrize(("truth", "held_out", "particles"), [(0.3, 150, 16), (0.3, 150, 400), (0.7, 60, 100)])
def test_with_abstentions_the_interval_covers_the_truth_in_at_least_90_percent_of_trials(truth, held_out, particles):
    rng = np.random.default_rng(17)
    hits = 0
    for _ in range(300):
        confusion = DefectConfusion(true_stacking_fault=rng.multinomial(held_out, ABSTAINING[0]).tolist(),
                                    true_no_stacking_fault=rng.multinomial(held_out, ABSTAINING[1]).tolist())
        e = estimate_defect_fraction(*labelled_abstaining(rng, truth, particles), confusion)
        hits += e.lower <= truth <= e.upper
    assert hits / 300 >= 0.9


def test_a_manifest_of_two_columns_reads_as_nothing_abstained():
    old = DefectConfusion.model_validate_json('{"true_stacking_fault": [128, 22], "true_no_stacking_fault": [15, 135]}')
    assert old == MEDIOCRE and old.true_stacking_fault == (128, 22, 0)
    assert old.rates == ((128 / 150, 22 / 150, 0.0), (15 / 150, 135 / 150, 0.0))
    assert DefectConfusion.model_validate_json(old.model_dump_json()) == old  # written back with three columns
    with pytest.raises(pydantic.ValidationError):
        DefectConfusion(true_stacking_fault=(1, 2, 3, 4), true_no_stacking_fault=(3, 40))
    with pytest.raises(pydantic.ValidationError, match="both classes"):  # every true fault abstained: nothing measured
        DefectConfusion(true_stacking_fault=(0, 0, 20), true_no_stacking_fault=(3, 40, 1))


def test_without_confusion_it_is_the_jeffreys_interval_of_the_raw_counts():
    e = estimate_defect_fraction(4, 16, None)
    assert e.raw == e.estimate == 0.2 and not e.corrected
    assert (e.lower, e.upper) == pytest.approx(stats.beta.ppf([0.025, 0.975], 4.5, 16.5))
    assert estimate_defect_fraction(0, 5, None).lower == 0.0 and estimate_defect_fraction(5, 0, None).upper == 1.0
    narrow = estimate_defect_fraction(4, 16, None, level=0.5)
    assert e.lower < narrow.lower < narrow.upper < e.upper


def test_the_correction_follows_rogan_gladen_and_stays_in_the_unit_interval():
    e = estimate_defect_fraction(30, 70, MEDIOCRE)
    se, sp = 128 / 150, 135 / 150
    assert e.corrected and e.estimate == pytest.approx((0.3 + sp - 1) / (se + sp - 1))
    assert estimate_defect_fraction(0, 50, MEDIOCRE).estimate == 0.0  # fewer faults than the false positives: 0
    assert estimate_defect_fraction(50, 0, MEDIOCRE).estimate == 1.0
    perfect = DefectConfusion(true_stacking_fault=(500, 0), true_no_stacking_fault=(0, 500))
    assert estimate_defect_fraction(30, 70, perfect).estimate == pytest.approx(0.3)
    for n_sf in range(0, 41, 4):
        for n_nosf in range(0, 41, 4):
            if n_sf + n_nosf:
                e = estimate_defect_fraction(n_sf, n_nosf, MEDIOCRE)
                assert 0 <= e.lower <= e.estimate <= e.upper <= 1


def test_the_confusion_adds_width_and_a_useless_classifier_says_nothing():
    plain = estimate_defect_fraction(300, 700, None)
    corrected = estimate_defect_fraction(300, 700, MEDIOCRE)
    assert corrected.upper - corrected.lower > 1.5 * (plain.upper - plain.lower)
    chance = DefectConfusion(true_stacking_fault=(50, 50), true_no_stacking_fault=(50, 50))
    e = estimate_defect_fraction(300, 700, chance)
    assert e.lower < 0.1 and e.upper > 0.9


def test_no_particles_gives_none_everywhere_and_the_same_input_the_same_answer():
    for confusion in (None, MEDIOCRE):
        e = estimate_defect_fraction(0, 0, confusion)
        assert (e.raw, e.estimate, e.lower, e.upper, e.counted, str(e)) == (None, None, None, None, 0, "–")
    assert estimate_defect_fraction(7, 9, MEDIOCRE) == estimate_defect_fraction(7, 9, MEDIOCRE)
    assert str(estimate_defect_fraction(3, 7, None)) == "0.30 [0.09–0.61]"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="counts"):
        estimate_defect_fraction(-1, 3, None)
    with pytest.raises(ValueError, match="level"):
        estimate_defect_fraction(1, 3, None, level=1.0)
    with pytest.raises(pydantic.ValidationError, match="both classes"):
        DefectConfusion(true_stacking_fault=(0, 0), true_no_stacking_fault=(3, 40))
