"""The dataset directory: its layout, writing one image's files, telling complete images from
interrupted ones, ``dataset.json`` (what a resume must match) and the crop index.

Every file is written through :mod:`latticewatch.io.atomic` (a hidden temporary name, then a
rename), so a killed run leaves whole files or none, and an image counts as complete only once
its particles JSON, written last, names files that exist. Losing an image in a power cut costs a
recomputation only, so images are not fsynced; ``dataset.json`` is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch import __version__
from latticewatch.errors import InputError
from latticewatch.io import jsonio
from latticewatch.io.atomic import atomic_path, write_atomic
from latticewatch.training.simulate.config import SimulationConfig
from latticewatch.training.simulate.image import GENERATOR, SimulatedImage

logger = logging.getLogger(__name__)

#: Format of ``DIR/dataset.json``.
DATASET_FORMAT = "latticewatch.simulate/1"

LAYOUT = """\
DIR/dataset.json                 generator, seed, n, config, versions (a resume must match it)
DIR/README.md                    dataset card (regenerated from the per-image JSON at the end)
DIR/images/<name>.mrc            float32 electron counts; voxel size = pixel size in Å
DIR/labels/<name>.png            uint8 particle mask, 0 / 255
DIR/instances/<name>.tif         uint16 instance map, 0 = background, i = particle i
DIR/particles/<name>.json        conditions + particles (class, structure, bbox, defects, crops)
DIR/crops/<name>_pNN.mrc         square crop around particle NN (float32 counts)
DIR/crops/<name>_pNN_mask.png    its mask (that particle only), 0 / 255
DIR/crops/<name>_eNN.mrc (+mask) bare-carbon crop with a blob mask (class empty)
DIR/crops/index.csv              crop, mask, class, image, instance, pixel_size_nm
"""


def _image_paths(out: Path, name: str) -> dict[str, Path]:
    """The files of image ``name`` but its crops (see :data:`LAYOUT`)."""
    return {
        "image": out / "images" / f"{name}.mrc",
        "label": out / "labels" / f"{name}.png",
        "instances": out / "instances" / f"{name}.tif",
        "particles": out / "particles" / f"{name}.json",
    }


def _write_mrc(path: Path, data: np.ndarray, pixel_size_nm: float, label: str) -> None:
    import mrcfile

    with atomic_path(path, fsync=False) as tmp, mrcfile.new(tmp) as mrc:
        mrc.set_data(np.ascontiguousarray(data, np.float32))
        mrc.voxel_size = 10.0 * pixel_size_nm  # Å
        mrc.header.label[0] = label[:80].encode("ascii", "replace")
        mrc.header.nlabl = 1


def _write_png(path: Path, mask: np.ndarray) -> None:
    from PIL import Image

    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    write_atomic(path, lambda fh: image.save(fh, format="PNG"), fsync=False)


def write_image(out: Path, sim: SimulatedImage) -> dict[str, Any]:
    """Write one image's files; the particles JSON goes last and marks the image complete."""
    import tifffile

    paths = _image_paths(out, sim.name)
    px = sim.record["pixel_size_nm"]
    crop_rows = []
    for w in sim.crops:
        stem = f"{sim.name}_{w['kind']}{w['number']:02d}"
        r0, c0, r1, c1 = w["window"]
        _write_mrc(out / "crops" / f"{stem}.mrc", sim.counts[r0:r1, c0:c1], px, f"latticewatch simulate {stem}")
        _write_png(out / "crops" / f"{stem}_mask.png", w["mask"])
        crop_rows.append({"crop": f"{stem}.mrc", "mask": f"{stem}_mask.png", "class": w["class"],
                          "instance": w["instance"], "window": w["window"]})
    _write_mrc(paths["image"], sim.counts, px, f"latticewatch simulate {sim.name} seed {sim.record['seed']}")
    _write_png(paths["label"], sim.instances > 0)
    def write_instances(fh) -> None:
        tifffile.imwrite(fh, sim.instances, photometric="minisblack", compression="zlib")

    write_atomic(paths["instances"], write_instances, fsync=False)
    record = dict(sim.record)
    record["crops"] = crop_rows
    record["files"] = {k: str(v.relative_to(out)) for k, v in paths.items()}
    write_atomic(paths["particles"], (jsonio.dumps(record, indent=1) + "\n").encode(), fsync=False)
    return record


def is_complete(out: Path, name: str, seed: int) -> bool:
    """Whether image ``name`` is fully written (its JSON parses, matches, and names existing files).

    Examples
    --------
    >>> import tempfile
    >>> is_complete(Path(tempfile.mkdtemp()), "sim_000000", 0)
    False
    """
    path = _image_paths(out, name)["particles"]
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("generator") != GENERATOR or record.get("seed") != seed:
        return False
    files = [out / f for f in record.get("files", {}).values()]
    files += [out / "crops" / c[k] for c in record.get("crops", []) for k in ("crop", "mask")]
    return all(f.is_file() for f in files)


class DatasetMismatch(InputError):
    """An existing dataset directory was made with other settings; the message lists them."""


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"latticewatch": __version__}
    for pkg in ("abtem", "ase", "numpy", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def prepare_dataset(out: Path, n: int, seed: int, config: SimulationConfig, *, preset: str = "default",
                    command: str | None = None) -> dict[str, Any]:
    """Create ``out`` (or check that it holds the same dataset) and write ``dataset.json``.

    ``n`` may grow between runs (image ``i`` depends only on the seed and ``i``); everything else
    must match.

    Raises
    ------
    DatasetMismatch
        When ``out/dataset.json`` records another generator, seed or configuration.
    """
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "labels", "instances", "particles", "crops"):
        (out / sub).mkdir(exist_ok=True)
    meta_path = out / "dataset.json"
    current = {
        "format": DATASET_FORMAT,
        "generator": GENERATOR,
        "seed": int(seed),
        "n": int(n),
        "preset": preset,
        "config": json.loads(config.model_dump_json()),
        "versions": _versions(),
        "command": command,
    }
    if meta_path.exists():
        current = _resumed(out, meta_path, current)
    write_atomic(meta_path, (jsonio.dumps(current, indent=2) + "\n").encode())
    return current


def _resumed(out: Path, meta_path: Path, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` for a folder that already holds ``meta_path``: refused unless the same dataset.

    The larger ``n`` wins; the versions and command of the first run are kept.
    """
    try:
        old = json.loads(meta_path.read_text())
    except ValueError as err:
        raise DatasetMismatch(f"{meta_path} is not valid JSON ({err}); remove it or use another --out") from err
    problems = _differences(old, current)
    if problems:
        raise DatasetMismatch(
            f"{out} holds a dataset made with other settings; resume it with the same options, or use another "
            "--out:\n  " + "\n  ".join(problems)
        )
    if old.get("versions") != current["versions"]:
        logger.warning("%s was started with %s, now %s: images may differ in the last bits",
                       out, old.get("versions"), current["versions"])
    return {
        **current,
        "n": max(int(old.get("n", 0)), current["n"]),
        "versions": old.get("versions", current["versions"]),
        "command": old.get("command", current["command"]),
    }


def _differences(old: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What makes ``old`` (a ``dataset.json``) another dataset than ``current``, one line each."""
    problems = []
    for key in ("format", "generator", "seed"):
        if old.get(key) != current[key]:
            problems.append(f"{key}: {old.get(key)!r} in the folder, {current[key]!r} now")
    old_config, new_config = old.get("config", {}), current["config"]
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            problems.append(f"config.{key}: {old_config.get(key)!r} in the folder, {new_config.get(key)!r} now")
    return problems


def read_records(out: Path) -> list[dict[str, Any]]:
    """The per-image JSON records in ``out/particles`` by name; unreadable ones are logged and skipped.

    Examples
    --------
    >>> import tempfile
    >>> read_records(Path(tempfile.mkdtemp()))
    []
    """
    records = []
    for path in sorted((out / "particles").glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            logger.warning("skipping unreadable %s: %s", path, err)
    return records


def write_crop_index(out: Path) -> int:
    """Regenerate ``out/crops/index.csv`` from the per-image JSON files; returns its rows.

    Columns: ``crop``, ``mask`` (file names in ``crops/``), ``class``, ``image`` (image stem),
    ``instance`` (0 for bare carbon), ``pixel_size_nm``.
    """
    rows = []
    for rec in read_records(out):
        for c in rec.get("crops", []):
            rows.append({"crop": c["crop"], "mask": c["mask"], "class": c["class"], "image": rec["name"],
                         "instance": c["instance"], "pixel_size_nm": f"{rec['pixel_size_nm']:.6f}"})
    buf = io.StringIO()
    columns = ["crop", "mask", "class", "image", "instance", "pixel_size_nm"]
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "crops" / "index.csv", buf.getvalue().encode(), fsync=False)
    return len(rows)


