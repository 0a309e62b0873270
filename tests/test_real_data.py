"""The shipped nanoparticle profile on the real micrographs of ``../shared/data/real-nanoparticles``.

Its manifest records `latticewatch evaluate` on these tiles (``training.real_evaluate``) next to the published
pyNanoFind models and the classical baselines, and the by-image cross-validation that is its real accuracy
(``training.cross_validation_real``). These tests keep both honest: the profile must still score what it recorded,
and what it recorded must beat the published models and the baselines.
"""

import json

from latticewatch.cli import main
from latticewatch.models.manifest import read_manifest
from latticewatch_nanoparticles import profile_dir
from shared_data import SHARED_DATA, requires

REAL = SHARED_DATA / "real-nanoparticles"
MANIFEST = read_manifest(profile_dir)


@requires("real-nanoparticles", "images")
def test_the_shipped_profile_still_scores_its_recorded_real_data_dice(capsys):
    recorded = MANIFEST.training["real_evaluate"].metrics
    code = main(["evaluate", "--profile", "nanoparticles", "--images", str(REAL / "images"), "--labels",
                 str(REAL / "labels"), "--baselines", "none", "--json", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["n_images"] == recorded["n_images"] == 15
    assert report["model"]["dice"] >= recorded["model"]["dice"] - 0.005, "the real-data Dice fell below the floor"


def test_the_recorded_real_accuracy_beats_the_published_models_and_the_baselines():
    cv = MANIFEST.training["cross_validation_real"].metrics
    pooled = cv["model"]["pooled"]["dice"]
    assert pooled >= 0.85
    assert all(b["pooled"]["dice"] < pooled for b in cv["baselines"].values())
    published = MANIFEST.training["real_evaluate"].metrics["published_pynanofind"]
    assert len(published) == 3 and all(p["dice"] < pooled for p in published.values())
    assert "zscore" == MANIFEST.segmentation.normalisation  # the answer must not move with global contrast


def test_the_graphene_profile_records_its_cross_validated_accuracy_on_real_frames():
    from latticewatch_graphene import profile_dir as graphene_dir

    cv = read_manifest(graphene_dir).training["cross_validation"].metrics
    pooled = cv["model"]["pooled"]
    assert pooled["jaccard"] >= 0.86 and pooled["jaccard"] > cv["baselines"]["bragg"]["pooled"]["jaccard"]
    assert cv["folds"] == 5  # by series: a series never straddles train and test
