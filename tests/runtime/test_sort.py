"""`latticewatch sort` with the shipped graphene profile on real graphene micrographs (Sadre et al.
2021): the ranking by clean fraction follows the hand-labelled clean fraction."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from latticewatch.cli import main
from shared_data import SHARED_DATA, requires

DATA = SHARED_DATA / "graphene-contamination"
pytestmark = requires("graphene-contamination", "images")


@pytest.fixture(scope="module")
def graphene_profile():
    from latticewatch_graphene import profile_dir

    return str(profile_dir)


def true_clean_fraction(name: str) -> float:
    return 1.0 - float((np.asarray(Image.open(DATA / "labels" / f"{name}.png")) > 0).mean())


def test_sort_order_follows_the_labelled_clean_fraction(graphene_profile, capsys):
    assert main(["sort", str(DATA / "images"), "--profile", graphene_profile, "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    frames = result["frames"]
    assert len(frames) == len(list((DATA / "images").glob("*.png"))) and result["failures"] == []
    assert [f["rank"] for f in frames] == list(range(1, len(frames) + 1))
    ratios = [f["content_ratio"] for f in frames]
    assert ratios == sorted(ratios) and result["order"] == "ascending"
    assert all(f["content_ratio"] == pytest.approx(1 - f["coverage"], abs=1e-5) for f in frames)
    truth = [true_clean_fraction(Path(f["file"]).stem) for f in frames]
    rho = spearmanr(ratios, truth).statistic
    # the shipped net has seen these frames; held out (cross-validation) the rank correlation is
    # reported in the manifest — this checks the pipeline ranks by the right quantity
    assert rho > 0.7, rho


def test_sort_table_descending_and_a_bad_file(tmp_path, graphene_profile, capsys):
    names = sorted(p.stem for p in (DATA / "images").glob("*.png"))[:3]
    for name in names:
        shutil.copy(DATA / "images" / f"{name}.png", tmp_path / f"{name}.png")
    (tmp_path / "broken.mrc").write_bytes(b"not an MRC file")
    (tmp_path / "notes.txt").write_text("ignored: not a micrograph")
    assert main(["sort", str(tmp_path), "--profile", graphene_profile, "--descending", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["rank", "file", "clean", "fraction"]
    body = [line.split() for line in lines[1:4]]
    assert [row[0] for row in body] == ["1", "2", "3"]
    assert sorted(Path(row[1]).stem for row in body) == names
    values = [float(row[2]) for row in body]
    assert values == sorted(values, reverse=True) and all(0 <= v <= 1 for v in values)
    assert "3 frame(s) ranked" in lines[4] and "1 failed" in lines[4] and "contamination" in lines[4]
    assert "broken.mrc" in captured.err


def test_sort_refuses_a_missing_directory(tmp_path, graphene_profile, capsys):
    assert main(["sort", str(tmp_path / "nosuch"), "--profile", graphene_profile]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_process_table_of_a_profile_without_classifier_shows_content_ratio(tmp_path, capsys):
    image = sorted((DATA / "images").glob("*.png"))[0]
    assert main(["process", str(image), "--profile", "graphene", "--out", str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "content ratio" in header and "SF" not in header
    report = json.loads((tmp_path / f"{image.stem}.json").read_text())
    assert row.split()[-2] == f"{report['content_ratio']:.1%}"
