"""The dataset card (``DIR/README.md``): ``card.md`` filled in from ``dataset.json`` and the
per-image JSON files, regenerated at the end of every run.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from latticewatch.frame import CLASSES
from latticewatch.io.atomic import write_atomic
from latticewatch.training.simulate.config import MASK_ATOM_RADIUS_NM, MASK_CLOSING_NM, PARTICLE_CLASSES
from latticewatch.training.simulate.output import LAYOUT, read_records


def _table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _histogram(values: list[float], edges: list[float], fmt: str = "{:g}") -> str:
    if not values:
        return "(none)"
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    peak = max(int(counts.max()), 1)
    rows = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        bar = "█" * round(30 * c / peak)
        rows.append([f"{fmt.format(lo)}–{fmt.format(hi)}", int(c), bar])
    return _table(["range", "count", ""], rows)


def _quantiles(values: list[float], fmt: str = "{:.3g}") -> str:
    if not values:
        return "(none)"
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return " / ".join(fmt.format(v) for v in q) + " (min / 25 % / median / 75 % / max)"


def render_dataset_card(out: Path) -> str:
    """The dataset card of ``out`` from its ``dataset.json`` and per-image JSON files."""
    meta = json.loads((out / "dataset.json").read_text())
    records = read_records(out)
    cfg = meta["config"]
    values = {
        "generator": meta["generator"],
        "seed": meta["seed"],
        "n_requested": meta["n"],
        "n_images": len(records),
        "n_particles": sum(len(r["particles"]) for r in records),
        "preset": meta.get("preset", "default"),
        "command": meta.get("command") or "(not recorded)",
        "versions": ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
        "size": cfg["size"],
        "mask_radius_nm": MASK_ATOM_RADIUS_NM,
        "closing_nm": MASK_CLOSING_NM,
        "config_json": json.dumps(cfg, indent=2),
        "layout": LAYOUT,
        **_composition(records),
        **_conditions(records, cfg),
    }
    template = resources.files("latticewatch.training.simulate").joinpath("card.md").read_text(encoding="utf-8")
    return string.Template(template).substitute(values)


def _composition(records: list[dict[str, Any]]) -> dict[str, str]:
    """The card's tables of classes, crops, defects, shapes, zone axes and sizes."""
    particles = [p for r in records for p in r["particles"]]
    members = [m for p in particles for m in p["members"]]
    by_class = Counter(p["class"] for p in particles)
    by_class_material = Counter((p["class"], p["material"]) for p in particles)
    materials = sorted({p["material"] for p in particles})
    class_rows = [[c, by_class.get(c, 0)] + [by_class_material.get((c, m), 0) for m in materials]
                  for c in PARTICLE_CLASSES]
    empty_images = sum(1 for r in records if r["empty_field"])
    class_rows.append(["empty (images without particles)", empty_images] + ["" for _ in materials])

    crops = Counter(c["class"] for r in records for c in r.get("crops", []))
    defects = Counter(d["type"] for m in members for d in m.get("defects", []))
    shapes = Counter(f"{m['material']} {m['structure']} {m['shape']}" for m in members)
    zones = Counter(str(m.get("zone_axis")) for m in members)
    return {
        "class_table": _table(["class", "particles"] + materials, class_rows),
        "crop_table": _table(["class", "crops"], [[c, crops.get(c, 0)] for c in CLASSES]),
        "defect_table": _counts_table("defect", defects),
        "shape_table": _counts_table("material, structure, shape", shapes),
        "zone_table": _counts_table("zone axis", zones),
        "size_hist": _histogram([p["equivalent_diameter_nm"] for p in particles], list(range(17))),
        "member_size_hist": _histogram([m["size_nm"] for m in members], list(range(13))),
    }


def _conditions(records: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, str]:
    """The card's statistics of the imaging conditions and of the time each image took."""
    doses = [r["dose_e_per_a2"] for r in records]
    defoci = [r["defocus_nm"] for r in records]
    seconds = [r.get("seconds", float("nan")) for r in records]
    cpu_seconds = [r.get("cpu_seconds", float("nan")) for r in records]
    detectors = Counter(r["conditions"]["detector"]["mode"] for r in records)
    dose_edges = list(np.geomspace(cfg["dose_e_per_a2"][0], cfg["dose_e_per_a2"][1], 7))
    d_lo, d_hi = cfg["defocus_nm"]
    return {
        "dose_hist": _histogram(doses, dose_edges, "{:.0f}"),
        "dose_quantiles": _quantiles(doses, "{:.0f}"),
        "defocus_hist": _histogram(defoci, list(np.linspace(d_lo, d_hi, 9)), "{:.0f}"),
        "defocus_quantiles": _quantiles(defoci, "{:.1f}"),
        "pixel_quantiles": _quantiles([r["pixel_size_nm"] for r in records], "{:.4f}"),
        "carbon_quantiles": _quantiles([r["conditions"]["carbon"]["thickness_nm"] for r in records], "{:.2f}"),
        "detector_table": _counts_table("detector", detectors, "images"),
        "seconds_quantiles": _quantiles([s for s in seconds if math.isfinite(s)], "{:.1f}"),
        "cpu_seconds_quantiles": _quantiles([s for s in cpu_seconds if math.isfinite(s)], "{:.1f}"),
    }


def _counts_table(what: str, counts: Counter, unit: str = "particles") -> str:
    return _table([what, unit], sorted(counts.items())) if counts else "(none)"


def write_dataset_card(out: Path) -> Path:
    """Regenerate ``out/README.md`` (the dataset card) from what is on disk."""
    path = Path(out) / "README.md"
    write_atomic(path, render_dataset_card(Path(out)).encode("utf-8"), fsync=False)
    return path
