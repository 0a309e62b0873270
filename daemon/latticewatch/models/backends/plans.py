"""The TensorRT plan cache: which plan fits this ONNX, TensorRT release, GPU and set of shapes.

A plan is only valid for the TensorRT version, the GPU model and the input shapes it was built for, so
its key (`plan_key`) holds the ONNX's sha256, the TensorRT version (or the major version for a
version-compatible plan), the GPU name and compute capability, the shapes and the precision. Each plan
sits beside a JSON sidecar holding its own sha256, checked before it is loaded (`PlanCache.load`).
Nothing here needs TensorRT or a GPU, which is why it lives apart from `tensorrt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from latticewatch.errors import ModelError
from latticewatch.io.atomic import write_atomic
from latticewatch.models.manifest import sha256_of
from latticewatch.models.precision import FP16_FORMAT

log = logging.getLogger(__name__)


def default_plan_cache() -> Path:
    """Where plans live unless told: ``$LATTICEWATCH_PLAN_CACHE``, else ``$XDG_CACHE_HOME/latticewatch/plans``,
    else ``~/.cache/latticewatch/plans``.

    >>> default_plan_cache().name
    'plans'
    """
    if os.environ.get("LATTICEWATCH_PLAN_CACHE"):
        return Path(os.environ["LATTICEWATCH_PLAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latticewatch" / "plans"


# ----------------------------------------------------------------------------- shapes and keys


@dataclass(frozen=True)
class Shapes:
    """The optimisation profile: spatial sides ``min_side``–``max_side`` (tuned for ``opt_side``), batch
    1–``max_batch`` (tuned for ``opt_batch``); fixed dimensions of the ONNX input keep their size.

    >>> Shapes().text
    '64-1024-4096xb1-4'
    """

    min_side: int = 64
    opt_side: int = 1024
    max_side: int = 4096
    max_batch: int = 4
    opt_batch: int = 1

    def __post_init__(self):
        if not 1 <= self.min_side <= self.opt_side <= self.max_side:
            raise ValueError(f"shapes need 1 <= min <= opt <= max, got {self.min_side}, {self.opt_side}, "
                             f"{self.max_side}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"batch needs 1 <= opt <= max, got {self.opt_batch}, {self.max_batch}")

    @property
    def text(self) -> str:
        return f"{self.min_side}-{self.opt_side}-{self.max_side}xb{self.opt_batch}-{self.max_batch}"

    def profile(self, dims: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) of an input whose ONNX shape is ``dims`` (``-1`` dynamic; axis 0 the batch).

        >>> Shapes(max_batch=8).profile((-1, 1, -1, -1))
        ((1, 1, 64, 64), (1, 1, 1024, 1024), (8, 1, 4096, 4096))
        """
        low, opt, high = [], [], []
        for axis, size in enumerate(dims):
            if size >= 0:
                choice = (size, size, size)
            elif axis == 0:
                choice = (1, self.opt_batch, self.max_batch)
            else:
                choice = (self.min_side, self.opt_side, self.max_side)
            for target, value in zip((low, opt, high), choice):
                target.append(value)
        return tuple(low), tuple(opt), tuple(high)


def version_tag(tensorrt_version: str, version_compatible: bool) -> str:
    """The TensorRT part of a plan key: the exact version, or ``vc<major>`` for a version-compatible plan,
    which later releases of the same major version run too.

    >>> version_tag("11.4.0.106", False), version_tag("11.4.0.106", True)
    ('11.4.0.106', 'vc11')
    """
    return f"vc{tensorrt_version.split('.')[0]}" if version_compatible else tensorrt_version


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on; `digest` names its files in the cache."""

    onnx_sha256: str  # of the float32 ONNX the profile ships (the fp16 copy is a function of it and FP16_FORMAT)
    tensorrt: str  # `version_tag`
    gpu: str
    compute_capability: str
    shapes: str  # `Shapes.text`
    precision: str  # "fp32", "fp16-v<FP16_FORMAT>" or "int8-<calibration set sha256 prefix>"

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


def plan_key(onnx_sha256: str, tensorrt_version: str, gpu: str, compute_capability: str, shapes: Shapes,
             precision: str, *, version_compatible: bool = False, calibration_sha256: str | None = None) -> PlanKey:
    """The cache key of a plan (a pure function: no GPU or TensorRT needed).

    Examples
    --------
    >>> key = plan_key("ab" * 32, "11.4.0.106", "NVIDIA H200", "9.0", Shapes(), "fp16")
    >>> key.precision, key.tensorrt, len(key.digest)
    ('fp16-v1', '11.4.0.106', 32)
    """
    if precision == "fp16":
        precision = f"fp16-v{FP16_FORMAT}"
    elif precision == "int8":
        if not calibration_sha256:
            raise ValueError("an int8 plan key needs the calibration set's sha256")
        precision = f"int8-{calibration_sha256[:16]}"
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    return PlanKey(onnx_sha256, version_tag(tensorrt_version, version_compatible), gpu, compute_capability,
                   shapes.text, precision)


# ----------------------------------------------------------------------------- the cache


class CorruptPlanError(ModelError):
    """A cached plan whose bytes or sidecar do not match what the cache recorded."""


@dataclass(frozen=True)
class CachedPlan:
    key: PlanKey
    path: Path
    sidecar: dict = field(repr=False)

    @property
    def version_compatible(self) -> bool:
        return bool(self.sidecar.get("version_compatible"))


class PlanCache:
    """Plans on disk: ``<root>/<precision>-<digest>.plan`` beside a ``.json`` sidecar that holds
    the key, the plan's sha256 and size, and how it was built; fp16 ONNX copies in ``<root>/onnx/``;
    TensorRT timing caches in ``<root>/timing/``.

    A plan is written before its sidecar, each atomically, so a reader sees a complete plan with its
    sidecar or no entry at all; a plan whose bytes do not match the sidecar is `CorruptPlanError`.

    Examples
    --------
    >>> cache = PlanCache(default_plan_cache())  # doctest: +SKIP
    >>> cache.load(key)  # doctest: +SKIP
    CachedPlan(key=PlanKey(...), path=PosixPath('.../fp16-v1-3f2a....plan'))
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: PlanKey) -> Path:
        return self.root / f"{key.precision}-{key.digest}.plan"

    def store(self, key: PlanKey, plan: bytes, **facts) -> CachedPlan:
        """Write ``plan`` under ``key`` with its sidecar (``facts``: how it was built); returns the entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        write_atomic(path, plan)
        sidecar = {"key": asdict(key), "plan_sha256": hashlib.sha256(plan).hexdigest(), "plan_bytes": len(plan),
                   "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **facts}
        write_atomic(path.with_suffix(".json"), (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode())
        return CachedPlan(key, path, sidecar)

    def load(self, key: PlanKey) -> CachedPlan | None:
        """The entry of ``key`` with its plan checked, ``None`` when there is none; raises `CorruptPlanError`."""
        plan_path = self.path(key)
        sidecar_path = plan_path.with_suffix(".json")
        if not (plan_path.exists() and sidecar_path.exists()):
            return None  # the sidecar is written last: without it the entry was never finished
        try:
            sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
            recorded, expected = PlanKey(**sidecar["key"]), sidecar["plan_sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptPlanError(f"{sidecar_path}: unreadable plan sidecar ({err})") from err
        if recorded != key:
            raise CorruptPlanError(f"{sidecar_path}: records key {recorded}, not {key}")
        if sha256_of(plan_path) != expected:
            raise CorruptPlanError(f"{plan_path}: the plan's sha256 does not match its sidecar (truncated or "
                                   "changed); delete it and compile again")
        return CachedPlan(key, plan_path, sidecar)

    def entries(self) -> list[tuple[PlanKey, dict, float]]:
        """Every readable sidecar's key, content and modification time (unreadable ones are logged and skipped)."""
        found = []
        for sidecar_path in sorted(self.root.glob("*.json")):
            try:
                sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
                found.append((PlanKey(**sidecar["key"]), sidecar, sidecar_path.stat().st_mtime))
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.warning("%s: skipped, not a plan sidecar (%s)", sidecar_path, err)
        return found

    def onnx_path(self, source: Path, onnx_sha256: str, precision: str) -> Path:
        """Where the reduced-precision ONNX copy of ``source`` goes (never beside the installed profile)."""
        return self.root / "onnx" / f"{source.stem}-{onnx_sha256[:16]}.{precision}.onnx"

    def timing_cache_path(self, tensorrt_version: str, gpu: str, compute_capability: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"{tensorrt_version}-{gpu}-sm{compute_capability}")
        return self.root / "timing" / f"{slug}.cache"




def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:4])


def find_plan(cache: PlanCache, onnx_sha256: str, runtime_version: str, lean: bool, gpu: str, capability: str,
              precisions: list[str], preferred: Shapes) -> CachedPlan | None:
    """The best cached plan of ``onnx_sha256`` for this GPU that this runtime can load, or ``None``.

    Loadable: built by this exact TensorRT (not for the lean runtime, which runs only version-compatible
    plans), or version-compatible and built by this or an older release of the same major version.
    Preferred, in order: the earlier of ``precisions`` (``fp32``, ``fp16``, ``int8``), a plan of this
    exact version, the ``preferred`` shapes, the newest.
    """
    ranked = []
    for key, sidecar, mtime in cache.entries():
        if (key.onnx_sha256, key.gpu, key.compute_capability) != (onnx_sha256, gpu, capability):
            continue
        kind = key.precision.split("-")[0]
        if kind not in precisions or (kind == "fp16" and key.precision != f"fp16-v{FP16_FORMAT}"):
            continue
        exact = key.tensorrt == runtime_version and not lean
        built_with = _version_tuple(str(sidecar.get("built_with", "")))
        # a plan without its own lean runtime needs the lean runtime of the release that built it
        newest = built_with == _version_tuple(runtime_version) if sidecar.get("exclude_lean_runtime") else True
        compatible = (key.tensorrt == version_tag(runtime_version, True) and newest
                      and built_with <= _version_tuple(runtime_version))
        if exact or compatible:
            ranked.append(((precisions.index(kind), not exact, key.shapes != preferred.text, -mtime), key))
    for _, key in sorted(ranked, key=lambda item: item[0]):
        entry = cache.load(key)
        if entry is not None:
            return entry
    return None




def default_shapes(role: str) -> Shapes:
    """The profile ``open`` and ``compile`` use unless told: frames 64–4096 px (tuned for 1024), up to 4 at
    once; classifier crops up to 64 per call (tuned for 16).

    >>> default_shapes("classifier").max_batch
    64
    """
    return Shapes(max_batch=64, opt_batch=16) if role == "classifier" else Shapes()
