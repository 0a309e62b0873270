"""Labelled data on disk: pairing by stem, clear errors naming the file, series-grouped folds."""

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from PIL import Image

from latticewatch.training.data.labelled import LabelledDataError, group_folds, load_labelled, series_of
from shared_data import SHARED_DATA, requires

GRAPHENE = SHARED_DATA / "graphene-contamination"


def _pair(root: Path, name: str, *, side: int = 32, label: np.ndarray | None = None, mrc_pixel_nm: float | None = None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(name)).integers(0, 1000, (side, side)).astype(np.uint16)
    if mrc_pixel_nm is None:
        Image.fromarray((pixels // 4).astype(np.uint8)).save(root / "images" / f"{name}.png")
    else:
        with mrcfile.new(root / "images" / f"{name}.mrc") as mrc:
            mrc.set_data(pixels)
            mrc.voxel_size = mrc_pixel_nm * 10  # Å
    if label is None:
        label = np.zeros((side, side), np.uint8)
        label[4:12, 4:20] = 255
    Image.fromarray(label).save(root / "labels" / f"{name}.png")
    return pixels


def test_images_pair_with_labels_by_stem_and_keep_pixel_size(tmp_path):
    pixels = _pair(tmp_path, "b_frame", mrc_pixel_nm=0.025)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[0:5, 0:5] = (255, 0, 0)  # a coloured drawing: any non-black colour is foreground
    _pair(tmp_path, "a_frame", label=rgb)
    data = load_labelled(tmp_path / "images", tmp_path / "labels")
    assert [d.name for d in data] == ["a_frame", "b_frame"]
    a, b = data
    assert a.mask.dtype == bool and a.mask.sum() == 25 and a.pixel_size_nm is None
    assert b.pixel_size_nm == pytest.approx(0.025) and np.array_equal(b.pixels, pixels)
    assert b.mask.sum() == 8 * 16
    only = load_labelled(tmp_path / "images", tmp_path / "labels", names=["b_frame"])
    assert [d.name for d in only] == ["b_frame"]


def test_missing_label_names_the_image_and_the_labels_folder(tmp_path):
    _pair(tmp_path, "ok")
    _pair(tmp_path, "orphan")
    (tmp_path / "labels" / "orphan.png").unlink()
    with pytest.raises(LabelledDataError, match=r"orphan\.png: no label orphan\.png/\.tif in .*labels"):
        load_labelled(tmp_path / "images", tmp_path / "labels")


def test_unreadable_or_mismatched_label_names_the_label_file(tmp_path):
    _pair(tmp_path, "frame")
    (tmp_path / "labels" / "frame.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(LabelledDataError, match=r"labels/frame\.png: unreadable label"):
        load_labelled(tmp_path / "images", tmp_path / "labels")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "labels" / "frame.png")
    with pytest.raises(LabelledDataError,
                       match=r"labels/frame\.png: mask shape \(16, 16\) differs from image shape \(32, 32\)"):
        load_labelled(tmp_path / "images", tmp_path / "labels")


def test_empty_or_missing_folders_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(LabelledDataError, match="no images"):
        load_labelled(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(LabelledDataError, match="nowhere: not a directory"):
        load_labelled(tmp_path / "nowhere", tmp_path / "labels")


def test_series_of_strips_the_layer_suffix_only():
    assert series_of("2014_0601_Gr_FS_Dyna1_01_layer_0007") == "2014_0601_Gr_FS_Dyna1_01"
    assert series_of("2013_1113_Gr_034") == "2013_1113_Gr_034"
    assert series_of("layer_0001_x") == "layer_0001_x"


@requires("graphene-contamination", "images")
def test_folds_never_split_a_series_of_the_real_graphene_images():
    names = sorted(p.stem for p in (GRAPHENE / "images").glob("*.png"))
    assert len(names) == 98
    folds = group_folds(names, 5, seed=0)
    assert sorted(n for f in folds for n in f) == names  # every image exactly once
    fold_of = {n: k for k, f in enumerate(folds) for n in f}
    series: dict[str, set[int]] = {}
    for n in names:
        series.setdefault(series_of(n), set()).add(fold_of[n])
    assert all(len(ks) == 1 for ks in series.values())
    assert any(len([n for n in names if series_of(n) == s]) > 1 for s in series)  # the check had something to check
    assert max(map(len, folds)) - min(map(len, folds)) <= 3
    assert group_folds(names, 5, seed=0) == folds  # deterministic
    assert group_folds(names, 5, seed=1) != folds


def test_more_folds_than_series_is_an_error():
    with pytest.raises(LabelledDataError, match="cannot make 3 folds from 2 series"):
        group_folds(["a_layer_0001", "a_layer_0002", "b"], 3)
