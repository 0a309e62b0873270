"""Per-frame report files written by ``latticewatch process``: JSON, particle CSV, overlay PNG and
(optionally) the probability map as ``.npy``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from latticewatch.frame import CLASSES, UNCERTAIN, Analysis, Frame
from latticewatch.io.atomic import write_atomic
from latticewatch.io.jsonio import dumps
from latticewatch.stages.features import FEATURE_NAMES

#: Outline colour per label (colour-blind-safe Okabe–Ito palette; grey for a particle no class was probable enough
#: for, yellow for one never classified: a profile without a classifier).
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "stacking_fault": (213, 94, 0),
    "no_stacking_fault": (0, 158, 115),
    "misoriented": (86, 180, 233),
    "agglomeration": (230, 159, 0),
    "empty": (204, 121, 167),
    UNCERTAIN: (153, 153, 153),
    "unclassified": (240, 228, 66),
}
#: Overlays of larger frames are shrunk to this side so the PNG stays quick to write and view.
OVERLAY_MAX_SIDE = 2048
CSV_COLUMNS = (
    ["frame_id", "region_id", "label", "area_nm2", "equivalent_diameter_nm", "centroid_row_px", "centroid_col_px",
     "centroid_row_nm", "centroid_col_nm", "bbox_row0", "bbox_col0", "bbox_row1", "bbox_col1", "area_px",
     "eccentricity", "solidity", "touches_edge", "agglomerate_suspect"]
    + [f"p_{c}" for c in CLASSES]
    + list(FEATURE_NAMES)
)


def summary(frame: Frame, analysis: Analysis) -> dict[str, Any]:
    """One line of the run summary (also the top of the per-frame JSON).

    ``coverage`` is the fraction of pixels in the profile's foreground class (particles,
    contamination); ``content_ratio`` the rest (1 − coverage), e.g. the clean-graphene fraction.
    ``out_of_domain`` lists why the model's answer is not to be trusted (empty when it is).
    ``defect_fraction`` is the estimate corrected for the classifier's confusion, ``defect_fraction_raw``
    the plain ratio of the counts, ``…_lower`` and ``…_upper`` its 95 % interval (`Analysis.defect`).
    """
    defect = analysis.defect
    return {
        "frame_id": frame.frame_id,
        "name": frame.name,
        "shape": list(frame.pixels.shape),
        "pixel_size_nm": frame.pixel_size_nm,
        "particles": len(analysis.regions),
        "coverage": round(analysis.coverage, 5),
        "content_ratio": round(analysis.content_ratio, 5),  # 1 − coverage: clean graphene for the graphene profile
        "class_counts": analysis.class_counts(),
        "defect_fraction": _rounded(defect.estimate),
        "defect_fraction_raw": defect.raw,
        "defect_fraction_lower": _rounded(defect.lower),
        "defect_fraction_upper": _rounded(defect.upper),
        "out_of_domain": list(analysis.out_of_domain),
        "mean_confidence": round(analysis.mean_confidence, 5),
        "seconds": round(sum(analysis.timings_s.values()), 5),
    }


def _rounded(fraction: float | None) -> float | None:
    # Monte-Carlo bounds move in the third decimal between seeds: more digits would claim precision they lack
    return None if fraction is None else round(fraction, 4)


def frame_report(frame: Frame, analysis: Analysis) -> dict[str, Any]:
    """The per-frame JSON of ``process``: the `summary`, the frame's provenance, timings and every region.

    The daemon's ``frame`` event is this without ``regions`` (one ``particle`` event each).

    Examples
    --------
    >>> report = frame_report(frame, analysis)  # doctest: +SKIP
    >>> report["frame_id"], len(report["regions"]) == report["particles"]  # doctest: +SKIP
    ('incoming:stack.mrc#0', True)
    """
    return {
        **summary(frame, analysis),
        "origin": frame.origin,
        "acquired_at": frame.acquired_at,
        "dtype": str(frame.pixels.dtype),
        "meta": frame.meta,
        "profile": analysis.profile,
        "model_ids": analysis.model_ids,
        "defect_confusion": analysis.defect_confusion.model_dump() if analysis.defect_confusion else None,
        "timings_s": {k: round(v, 6) for k, v in analysis.timings_s.items()},
        "warnings": list(analysis.warnings),
        "regions": [r.to_dict() for r in analysis.regions],
    }


def _csv_rows(analysis: Analysis):
    for r in analysis.regions:
        row = {
            "frame_id": analysis.frame_id, "region_id": r.region_id, "label": r.label, "area_nm2": r.area_nm2,
            "equivalent_diameter_nm": r.equivalent_diameter_nm, "centroid_row_px": r.centroid_px[0],
            "centroid_col_px": r.centroid_px[1], "centroid_row_nm": r.centroid_nm[0] if r.centroid_nm else None,
            "centroid_col_nm": r.centroid_nm[1] if r.centroid_nm else None, "bbox_row0": r.bbox[0],
            "bbox_col0": r.bbox[1], "bbox_row1": r.bbox[2], "bbox_col1": r.bbox[3], "area_px": r.area_px,
            "eccentricity": r.eccentricity, "solidity": r.solidity, "touches_edge": r.touches_edge,
            "agglomerate_suspect": r.agglomerate_suspect,
        }
        row.update({f"p_{c}": r.probabilities.get(c) for c in CLASSES})
        row.update(r.features)
        yield row


def overlay_image(frame: Frame, analysis: Analysis, *, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The frame (0.5–99.5 % contrast) with region outlines coloured by class, and a legend panel beside it.

    The legend sits right of the frame, never over it (on a small tile it would hide a third of the
    particles). A frame outside the model's domain gets a banner saying so along its bottom edge.
    Frames larger than ``max_side`` are subsampled first (the dashboard asks for a small one).
    """
    step = max(1, int(np.ceil(max(frame.pixels.shape) / max_side)))
    pixels = frame.pixels[::step, ::step].astype(np.float32)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    grey = (np.clip((pixels - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    mask = analysis.mask[::step, ::step].astype(bool)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(grey.shape) // 512), border_value=0)
    # colour each outline pixel by the region whose bounding box contains it
    for region in analysis.regions:
        r0, c0, r1, c1 = (v // step for v in region.bbox)
        box = edge[r0 : r1 + 1, c0 : c1 + 1]
        rgb[r0 : r1 + 1, c0 : c1 + 1][box] = CLASS_COLOURS.get(region.label, CLASS_COLOURS["unclassified"])
    frame_image = Image.fromarray(rgb)
    font = ImageFont.load_default(size=max(12, min(frame_image.size) // 40))
    counts = analysis.class_counts()
    names = CLASSES + ((UNCERTAIN,) if counts.get(UNCERTAIN) else ())  # a forest without a threshold has none
    texts = [f"{name.replace('_', ' ')}: {counts.get(name, 0)}" for name in names]
    measure = ImageDraw.Draw(frame_image)
    boxes = [measure.textbbox((0, 0), text, font=font) for text in texts]
    row = max(b[3] for b in boxes) + 8
    panel = max(b[2] for b in boxes) + 36
    width, height = frame_image.size
    image = Image.new("RGB", (width + panel, max(height, 6 + row * len(texts))), (0, 0, 0))
    image.paste(frame_image, (0, 0))
    draw = ImageDraw.Draw(image)
    for i, (name, text) in enumerate(zip(names, texts)):
        x, y = width + 8, 6 + i * row
        draw.rectangle((x, y + 2, x + 12, y + row - 10), fill=CLASS_COLOURS[name])
        draw.text((x + 18, y), text, fill=(255, 255, 255), font=font)
    if analysis.out_of_domain:
        _banner(draw, (width, height), font, "OUT OF MODEL DOMAIN: " + analysis.out_of_domain[0])
    return image


def _banner(draw: ImageDraw.ImageDraw, size: tuple[int, int], font, text: str) -> None:
    box = draw.textbbox((0, 0), text, font=font)
    height = box[3] - box[1] + 12
    draw.rectangle((0, size[1] - height, size[0], size[1]), fill=(213, 94, 0))
    draw.text((6, size[1] - height + 6 - box[1]), text, fill=(255, 255, 255), font=font)


def write_reports(frame: Frame, analysis: Analysis, out_dir: Path, *, save_probability: bool = False) -> list[Path]:
    """Write ``<name>.json``, ``<name>_particles.csv``, ``<name>_overlay.png`` (and the ``.npy``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / frame.name
    paths = [base.with_suffix(".json"), out_dir / f"{frame.name}_particles.csv", out_dir / f"{frame.name}_overlay.png"]
    report = dumps(frame_report(frame, analysis), indent=2).encode()
    write_atomic(paths[0], report)

    def write_csv(fh):
        text = io.TextIOWrapper(fh, newline="", encoding="utf-8")
        writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(_csv_rows(analysis))
        text.flush()
        text.detach()  # leave the binary handle open for fsync

    write_atomic(paths[1], write_csv)
    overlay = overlay_image(frame, analysis)
    # zlib level 1: 17 instead of 77 ms for a 512² frame's overlay (Pillow's default 6), and no larger
    write_atomic(paths[2], lambda fh: overlay.save(fh, format="PNG", compress_level=1))
    if save_probability:
        if analysis.probability is None:
            raise ValueError(f"{frame.frame_id}: probability map was not kept; analyse with keep_probability=True")
        paths.append(out_dir / f"{frame.name}_probability.npy")
        write_atomic(paths[-1], lambda fh: np.save(fh, analysis.probability.astype(np.float32)))
    return paths
