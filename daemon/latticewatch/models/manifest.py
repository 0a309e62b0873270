"""The model manifest: every profile directory has a ``manifest.json`` validated by this model.

A profile is data: the files it names are checked against their sha256 before use, and the
manifest states the pixel size and normalisation the network was trained with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latticewatch.frame import CLASSES
from latticewatch.models import architectures
from latticewatch.stages.isolate import IsolationParams
from latticewatch.stages.preprocess import Normalisation
from latticewatch.errors import ModelError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegmentationModel(_Strict):
    onnx: str = Field(description="ONNX file: input 'image' (N,1,H,W) float32 → particle probability (N,1,H,W)")
    weights: str | None = Field(None, description="safetensors file of the torch weights, for retraining")
    architecture: Literal["unet", "resnet18-unet", "fpn"] = Field("unet", description="network of models.architectures")
    widths: tuple[int, ...] = (4, 8, 16, 32)
    pixel_size_nm: float | None = Field(gt=0, description="pixel size the network was trained at")
    normalisation: Normalisation = "max"
    threshold: float = Field(0.5, ge=0, le=1)
    foreground: str = Field("particle", description="what the probability is of")

    @model_validator(mode="after")
    def _widths_fit_architecture(self) -> "SegmentationModel":
        try:
            architectures.check(self.architecture, self.widths)
        except architectures.ArchitectureError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def divisor(self) -> int:
        """Input sides of the ONNX model must be multiples of this."""
        return architectures.divisor(self.architecture, self.widths)


class ClassifierModel(_Strict):
    skops: str
    classes: tuple[str, ...] = CLASSES
    features: tuple[str, ...]


class ArchiveRules(_Strict):
    low_value_class: int = Field(0, description="class-mask value whose pixels may be reduced")
    min_mean_confidence: float = Field(0.9, description="below this the frame is archived losslessly")


class Training(_Strict):
    command: str
    metrics: dict[str, Any] = {}
    data: str = ""


class Manifest(_Strict):
    name: str
    version: str
    description: str = ""
    files: dict[str, str] = Field(description="file name → sha256 of every model file")
    segmentation: SegmentationModel
    classifier: ClassifierModel | None = None
    isolation: IsolationParams = IsolationParams()
    archive: ArchiveRules = ArchiveRules()
    training: dict[str, Training] = {}
    baselines: dict[str, dict[str, Any]] = Field(
        {},
        description="classical baselines (otsu, fourier, bragg) fitted for this profile by `latticewatch calibrate "
        "baselines`, used by `latticewatch evaluate`; parameters as latticewatch.training.assess.baselines writes them",
    )

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"files.{name}: expected a 64-character lowercase sha256, got {digest!r}")
        return files

    @model_validator(mode="after")
    def _one_threshold(self) -> "Manifest":
        # isolation applies the threshold, evaluate and calibrate report it from segmentation:
        # two values that drifted apart would make the measured metrics describe another mask
        if self.segmentation.threshold != self.isolation.threshold:
            raise ValueError(f"segmentation.threshold ({self.segmentation.threshold}) and isolation.threshold "
                             f"({self.isolation.threshold}) must be equal; set both to the calibrated value")
        return self


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(ModelError):
    """A profile directory whose manifest or files cannot be trusted."""


def read_manifest(directory: Path, *, verify: bool = True) -> Manifest:
    """Validate ``directory/manifest.json`` and (optionally) the sha256 of every file it lists."""
    path = directory / "manifest.json"
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json in this profile directory") from None
    except (json.JSONDecodeError, ValidationError) as err:
        raise ManifestError(f"{path}: invalid manifest: {err}") from None
    needed = {manifest.segmentation.onnx} | ({manifest.classifier.skops} if manifest.classifier else set())
    missing = needed - manifest.files.keys()
    if missing:
        raise ManifestError(f"{path}: files {sorted(missing)} are used but have no sha256 in 'files'")
    if verify:
        for name, expected in manifest.files.items():
            file = directory / name
            if not file.is_file():
                raise ManifestError(f"{path}: listed file {name} is missing")
            if sha256_of(file) != expected:
                raise ManifestError(f"{file}: sha256 does not match the manifest; the model file was altered")
    return manifest
