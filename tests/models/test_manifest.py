"""The manifest model's consistency rules, and the one place that reads, writes and updates it."""

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from latticewatch.io.atomic import is_temporary
from latticewatch.models.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    file_digests,
    read_manifest,
    recorded_command,
    relative_path,
    sha256_of,
    update_manifest,
    write_manifest,
)
from latticewatch_nanoparticles import profile_dir as PROFILE_DIR


def test_segmentation_and_isolation_thresholds_must_agree():
    raw = json.loads((PROFILE_DIR / "manifest.json").read_text())
    Manifest.model_validate(raw)
    raw["isolation"]["threshold"] = raw["segmentation"]["threshold"] + 0.1
    with pytest.raises(ValidationError, match="isolation.threshold"):
        Manifest.model_validate(raw)


def copy_of_profile(tmp_path):
    out = tmp_path / "profile"
    shutil.copytree(PROFILE_DIR, out, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    return out


def test_update_manifest_validates_verifies_and_writes_atomically(tmp_path):
    out = copy_of_profile(tmp_path)

    def lower(m):
        m["segmentation"]["threshold"] = m["isolation"]["threshold"] = 0.4

    assert update_manifest(out, lower, dry_run=True).segmentation.threshold == 0.4
    assert read_manifest(out).segmentation.threshold != 0.4  # a dry run writes nothing
    assert update_manifest(out, lower).segmentation.threshold == 0.4
    assert read_manifest(out).isolation.threshold == 0.4
    assert not [p for p in out.iterdir() if is_temporary(p)]

    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(ManifestError, match="invalid"):
        update_manifest(out, lambda m: m["segmentation"].update(threshold=0.3))  # isolation disagrees
    with pytest.raises(ManifestError, match="sha256"):
        update_manifest(out, lambda m: m["files"].update({"unet.onnx": "0" * 64}))
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_write_manifest_refuses_files_it_does_not_describe(tmp_path):
    out = copy_of_profile(tmp_path)
    manifest = read_manifest(out)
    (out / "forest.skops").write_bytes(b"another forest")
    with pytest.raises(ManifestError, match="forest.skops"):
        write_manifest(out, manifest)
    assert write_manifest(out, manifest.model_copy(update={"files": {**manifest.files, **file_digests(
        out, ["forest.skops"])}})).files["forest.skops"] == sha256_of(out / "forest.skops")


def test_recorded_commands_carry_no_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = Path("/data/sets/graphene")
    argv = ["train", "--images", f"{data}/images", "--labels", f"{data}/labels", "--out", str(tmp_path / "profiles/g"),
            "--json=/scratch/cv/fpn.json", "--name", "my profile", "--steps", "5"]
    assert recorded_command(argv, data) == ("latticewatch train --images graphene/images --labels graphene/labels "
                                            "--out profiles/g --json=fpn.json --name 'my profile' --steps 5")
    assert relative_path("sim/train/images", data) == "sim/train/images"  # as typed: already relative


@pytest.mark.parametrize("plugin", ["latticewatch_nanoparticles", "latticewatch_graphene"])
def test_shipped_manifests_record_no_machine_paths(plugin):
    directory = Path(importlib.import_module(plugin).profile_dir)
    manifest = read_manifest(directory)
    for key, entry in manifest.training.items():
        for text in (entry.command, entry.data):
            assert not re.search(r"(^|[\s='(])/(work|tmp|home|root|Users)/", text), f"{plugin} training.{key}: {text}"


def test_classifier_section_is_a_forest_or_a_cnn_and_old_manifests_read_as_forest(tmp_path):
    raw = json.loads((PROFILE_DIR / "manifest.json").read_text())
    # the shipped forest (its baseline beside the CNN) as manifests held it before classifier kinds
    old = {k: v for k, v in raw["baseline_classifier"].items() if k not in ("kind", "arrays", "uncertain_below",
                                                                              "defect_confusion")}
    assert Manifest.model_validate({**raw, "classifier": old}).classifier.kind == "forest"  # written before kinds
    with pytest.raises(ValidationError, match="needs 'arrays'"):
        Manifest.model_validate({**raw, "classifier": {**old, "skops": None}})
    cnn = {"kind": "cnn", "onnx": "other.onnx", "input": {"size_px": 64}, "uncertain_below": 0.55,
           "defect_confusion": {"true_stacking_fault": [40, 5], "true_no_stacking_fault": [3, 52]}}
    with pytest.raises(ValidationError, match=r"\['other.onnx'\] are used but have no sha256"):
        Manifest.model_validate({**raw, "classifier": cnn})
    raw["files"]["other.onnx"] = "0" * 64
    manifest = Manifest.model_validate({**raw, "classifier": cnn})
    clf = manifest.classifier
    assert clf.input.size_px == 64 and clf.defect_confusion.true_stacking_fault == (40, 5, 0)  # 2 columns read as 3
    assert clf.model_files == ("other.onnx",)
    with pytest.raises(ValidationError, match="'forest', 'cnn'"):
        Manifest.model_validate({**raw, "classifier": {**cnn, "kind": "svm"}})
    with pytest.raises(ValidationError, match="features"):
        Manifest.model_validate({**raw, "classifier": {**cnn, "features": ["fft_mean"]}})  # a forest's key

    out = copy_of_profile(tmp_path)
    with pytest.raises(ManifestError, match=r"(?s)invalid.*\['other.onnx'\] are used but have no sha256"):
        update_manifest(out, lambda m: m.update(classifier=cnn))
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "random_cnn.onnx", out / "other.onnx")

    def to_cnn(m):
        m["classifier"] = cnn
        m["files"]["other.onnx"] = sha256_of(out / "other.onnx")

    assert update_manifest(out, to_cnn).classifier.kind == "cnn"
    written = json.loads((out / MANIFEST_NAME).read_text())["classifier"]
    assert next(iter(written)) == "kind" and written["input"] == {"size_px": 64, "channels": ["image", "mask",
                                                                                             "log_power"]}
    assert read_manifest(out).classifier == clf
