"""The model manifest: every profile directory has a ``manifest.json`` validated by this model.

A profile is data: the files it names are checked against their sha256 before use, and the
manifest states the pixel size and normalisation the network was trained with.

This module is the only reader and writer of ``manifest.json``: `read_manifest`, `write_manifest`
(atomic, and only for files that match their sha256) and `update_manifest` (read, change, validate,
write). `recorded_command` and `relative_path` make the provenance a manifest records (the command
that trained a model, the data it saw) free of the training machine's absolute paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from latticewatch.errors import ModelError
from latticewatch.frame import CLASSES
from latticewatch.io.atomic import write_atomic
from latticewatch.models import architectures
from latticewatch.stages.crops import CropSpec
from latticewatch.stages.defect_fraction import DefectConfusion
from latticewatch.stages.domain import DomainRules
from latticewatch.stages.isolate import IsolationParams
from latticewatch.stages.preprocess import Normalisation

#: File name of the manifest inside a profile directory.
MANIFEST_NAME = "manifest.json"


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


class _Classifier(_Strict):
    kind: str  # first in the written manifest; each kind narrows it to its literal
    classes: tuple[str, ...] = CLASSES
    uncertain_below: float | None = Field(
        None, gt=0, le=1, description="a particle whose largest class probability is below this is labelled "
        "'uncertain' (its probabilities are still reported); none: always the most probable class")
    defect_confusion: DefectConfusion | None = Field(
        None, description="stacking-fault vs no-fault confusion on held-out data, written by the trainer; "
        "corrects the defect fraction")


class ForestClassifier(_Classifier):
    """The Groschner et al. (2021) random forest on the five region features."""

    kind: Literal["forest"] = "forest"
    arrays: str | None = Field(None, description="safetensors file of the flattened forest: what inference loads "
                               "(no scikit-learn needed); a profile without it loads the skops file instead")
    skops: str | None = Field(None, description="the fitted scikit-learn forest (skops), for training and inspection")
    features: tuple[str, ...]
    normalisation: Normalisation = Field(
        "max", description="intensity normalisation its features were computed with; the segmentation's may differ")

    @model_validator(mode="after")
    def _has_a_forest(self) -> "ForestClassifier":
        if self.arrays is None and self.skops is None:
            raise ValueError("a forest classifier needs 'arrays' (or, in older profiles, 'skops')")
        return self

    @property
    def model_files(self) -> tuple[str, ...]:
        """The files this section names (each must have a sha256 in the manifest's ``files``)."""
        return tuple(name for name in (self.arrays, self.skops) if name)


class CnnClassifier(_Classifier):
    """A CNN on each region's crop (`latticewatch.stages.crops.classifier_input`), run by ONNX Runtime."""

    kind: Literal["cnn"]
    onnx: str = Field(description="ONNX file: input 'crops' (N,C,S,S) float32 → output 'probabilities' "
                      "(N, n_classes), softmax inside the graph")
    weights: str | None = Field(None, description="safetensors file of the torch weights, for retraining")
    input: CropSpec = Field(CropSpec(), description="how a region becomes the network's input")

    @property
    def model_files(self) -> tuple[str, ...]:
        """The files this section names (each must have a sha256 in the manifest's ``files``)."""
        return tuple(name for name in (self.onnx, self.weights) if name)


def _classifier_kind(value: Any) -> str | None:
    # manifests written before the CNN have no ``kind``: their classifier is the forest
    if isinstance(value, dict):
        return value.get("kind", "forest")
    return getattr(value, "kind", None)


#: The manifest's ``classifier`` section: a forest or a CNN, told apart by ``kind`` (default ``forest``).
ClassifierModel = Annotated[
    Annotated[ForestClassifier, Tag("forest")] | Annotated[CnnClassifier, Tag("cnn")],
    Discriminator(_classifier_kind),
]


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
    baseline_classifier: ClassifierModel | None = Field(
        None, description="a second classifier kept to compare against (the paper's forest beside the CNN); "
        "`--classifier baseline` analyses with it")
    isolation: IsolationParams = IsolationParams()
    archive: ArchiveRules = ArchiveRules()
    domain: DomainRules = Field(DomainRules(), description="when a frame is outside the model's domain (flagged, "
                                "archived lossless, left out of the statistics)")
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
    def _used_files_listed(self) -> "Manifest":
        # every model file the pipeline opens is checked against its sha256 before use
        used = {self.segmentation.onnx}
        for section in (self.classifier, self.baseline_classifier):
            used |= set(section.model_files if section else ())
        missing = used - self.files.keys()
        if missing:
            raise ValueError(f"files {sorted(missing)} are used but have no sha256 in 'files'")
        return self

    @model_validator(mode="after")
    def _one_threshold(self) -> "Manifest":
        # isolation applies the threshold, evaluate and calibrate report it from segmentation:
        # two values that drifted apart would make the measured metrics describe another mask
        if self.segmentation.threshold != self.isolation.threshold:
            raise ValueError(f"segmentation.threshold ({self.segmentation.threshold}) and isolation.threshold "
                             f"({self.isolation.threshold}) must be equal; set both to the calibrated value")
        return self


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "empty"
    >>> _ = path.write_bytes(b"")
    >>> sha256_of(path)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """The manifest's ``files``: name → sha256 of each named file in ``directory``.

    >>> file_digests(Path("profiles/np"), ["unet.onnx", "forest.skops"])  # doctest: +SKIP
    {'unet.onnx': '9f2c…', 'forest.skops': '41d0…'}
    """
    return {name: sha256_of(Path(directory) / name) for name in names}


class ManifestError(ModelError):
    """A profile directory whose manifest or files cannot be trusted."""


def _verify_files(directory: Path, manifest: Manifest) -> None:
    path = directory / MANIFEST_NAME
    for name, expected in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise ManifestError(f"{path}: listed file {name} is missing")
        actual = sha256_of(file)
        if actual != expected:
            raise ManifestError(f"{file}: sha256 {actual} does not match the manifest's {expected}; "
                                "the model file was altered or damaged")


def read_manifest(directory: Path, *, verify: bool = True) -> Manifest:
    """Validate ``directory/manifest.json`` and (optionally) the sha256 of every file it lists.

    >>> from latticewatch_nanoparticles import profile_dir
    >>> read_manifest(profile_dir).segmentation.onnx
    'unet.onnx'
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest.json in this profile directory") from None
    except (json.JSONDecodeError, ValidationError) as err:
        raise ManifestError(f"{path}: invalid manifest: {err}") from None
    if verify:
        _verify_files(directory, manifest)
    return manifest


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Write ``directory/manifest.json`` atomically, after checking every listed file's sha256.

    A manifest is never written for files it does not describe, so a written profile always
    passes `read_manifest`.

    Examples
    --------
    >>> manifest = Manifest(name="np", version="0.1.0", files=file_digests(out, ["unet.onnx"]),
    ...                     segmentation={"onnx": "unet.onnx", "pixel_size_nm": 0.05})  # doctest: +SKIP
    >>> write_manifest(out, manifest)  # doctest: +SKIP
    """
    directory = Path(directory)
    _verify_files(directory, manifest)
    write_atomic(directory / MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())
    return manifest


def update_manifest(directory: Path, change: Callable[[dict[str, Any]], None], *, dry_run: bool = False) -> Manifest:
    """Apply ``change`` to the manifest's JSON, validate it, check the files' sha256, write it.

    The profile must be intact before the change (`read_manifest` with verification). A change
    that makes the manifest invalid raises `ManifestError` and leaves the file as it was;
    ``dry_run`` validates the change and writes nothing.

    Examples
    --------
    >>> def lower(m):
    ...     m["segmentation"]["threshold"] = m["isolation"]["threshold"] = 0.4
    >>> update_manifest(Path("profiles/np"), lower).segmentation.threshold  # doctest: +SKIP
    0.4
    """
    directory = Path(directory)
    read_manifest(directory)
    data = json.loads((directory / MANIFEST_NAME).read_text())
    change(data)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        raise ManifestError(f"{directory / MANIFEST_NAME}: the update would make the manifest invalid: {err}") from None
    return manifest if dry_run else write_manifest(directory, manifest)


# ------------------------------------------------------------------------------ provenance


def relative_path(path: str | os.PathLike, dataset: Path | None = None) -> str:
    """``path`` as a manifest records it: never a machine's absolute path.

    A relative path stays as it is. An absolute one is written relative to the working directory
    when it lies below it, else relative to the folder holding the data set ``dataset`` (so it
    starts with the data set's own folder name), else as its bare name.

    Examples
    --------
    >>> relative_path("/data/graphene/images", Path("/data/graphene"))
    'graphene/images'
    >>> relative_path("/scratch/cv/fpn.json", Path("/data/graphene")), relative_path("sim/train/images")
    ('fpn.json', 'sim/train/images')
    """
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    absolute = Path(os.path.normpath(text))
    bases = [Path.cwd()]
    if dataset is not None:
        bases.append(Path(os.path.abspath(dataset)).parent)
    for base in bases:
        if base.parent != base and absolute.is_relative_to(base):  # never relative to the filesystem root
            return absolute.relative_to(base).as_posix()
    return absolute.name


def recorded_command(argv: Sequence[str], dataset: Path | None = None) -> str:
    """The ``latticewatch …`` command line for a manifest, its absolute paths made relative.

    Every argument that is an absolute path (alone or after ``--option=``) goes through
    `relative_path`; ``dataset`` is the data set the command read (e.g. the folder holding
    ``--images`` and ``--labels``).

    Examples
    --------
    >>> recorded_command(["train", "--images", "/data/graphene/images", "--out=/scratch/np"], Path("/data/graphene"))
    'latticewatch train --images graphene/images --out=np'
    """
    def portable(arg: str) -> str:
        option, sep, value = arg.partition("=")
        if sep and option.startswith("--"):
            return f"{option}={relative_path(value, dataset)}"
        return relative_path(arg, dataset)

    return "latticewatch " + shlex.join(portable(arg) for arg in argv)
