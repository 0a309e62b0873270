"""``latticewatch models flatten-forest``: a profile with only its skops forest gains the flattened arrays."""

import logging
import shutil

import numpy as np

from latticewatch.cli import main
from latticewatch.frame import Frame
from latticewatch.models.manifest import read_manifest, sha256_of, update_manifest
from latticewatch.runtime.analyser import Analyser
from latticewatch.testing.synthetic.frames import generate_frame
from latticewatch_nanoparticles import profile_dir


def _skops_only_profile(tmp_path):
    """The shipped profile's forest (its baseline classifier) as profiles were before the arrays: the forest is
    the classifier, with no forest.safetensors and no ``classifier.arrays``."""
    out = tmp_path / "old-profile"
    shutil.copytree(profile_dir, out, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))

    def drop_arrays(m):
        m["classifier"] = m.pop("baseline_classifier")
        del m["classifier"]["arrays"], m["classifier"]["kind"], m["files"]["forest.safetensors"]
        for name in ("cnn.onnx", "cnn.safetensors"):
            del m["files"][name]

    update_manifest(out, drop_arrays)
    (out / "forest.safetensors").unlink()
    return out


def test_flatten_forest_adds_the_arrays_the_analyser_then_loads(tmp_path, capsys, caplog):
    old = _skops_only_profile(tmp_path)
    with caplog.at_level(logging.WARNING, logger="latticewatch.runtime.analyser"):
        Analyser(old, threads=1)
    assert f"latticewatch models flatten-forest {old}" in caplog.text  # the warning names the command

    assert main(["models", "flatten-forest", str(old)]) == 0
    assert "forest.safetensors written from forest.skops" in capsys.readouterr().out
    manifest = read_manifest(old)
    assert manifest.classifier.arrays == "forest.safetensors" and manifest.classifier.skops == "forest.skops"
    assert manifest.files["forest.safetensors"] == sha256_of(old / "forest.safetensors")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latticewatch.runtime.analyser"):
        flattened = Analyser(old, threads=1)
    assert "no flattened arrays" not in caplog.text
    assert flattened.model_ids["classifier"].startswith("forest.safetensors:")
    frame = Frame("f", generate_frame(np.random.default_rng(5), (256, 256), 0.05).image, 0.05)
    shipped = Analyser("nanoparticles", threads=1, classifier="baseline")
    got = [(r.label, r.probabilities) for r in flattened.analyse(frame).regions]
    assert got and got == [(r.label, r.probabilities) for r in shipped.analyse(frame).regions]


def test_flatten_forest_refuses_a_profile_without_a_forest(tmp_path, capsys):
    out = tmp_path / "seg-only"
    shutil.copytree(profile_dir, out, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))

    def drop_classifier(m):
        del m["classifier"], m["baseline_classifier"], m["files"]["forest.safetensors"], m["files"]["forest.skops"]

    update_manifest(out, drop_classifier)
    for forest in out.glob("forest.*"):
        forest.unlink()
    assert main(["models", "flatten-forest", str(out)]) == 2
    assert "has no skops forest to flatten" in capsys.readouterr().err
