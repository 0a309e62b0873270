"""Profile discovery through the ``latticewatch.profiles`` entry point group.

A plugin's entry point resolves to its profile directory (holding ``manifest.json`` and the model
files). Discovery is lazy and forgiving: a plugin that fails to import or whose manifest is
invalid is reported with the reason, and the others still load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from latticewatch.models.manifest import Manifest, ManifestError, read_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileEntry:
    name: str
    directory: Path | None
    manifest: Manifest | None
    error: str | None


def discover_profiles(*, verify: bool = False) -> dict[str, ProfileEntry]:
    """All installed profiles by name, each with its manifest or the reason it cannot be used."""
    found: dict[str, ProfileEntry] = {}
    for ep in entry_points(group="latticewatch.profiles"):
        try:
            directory = Path(ep.load())
            found[ep.name] = ProfileEntry(ep.name, directory, read_manifest(directory, verify=verify), None)
        except Exception as err:  # a broken plugin must not break discovery
            log.warning("profile %s is unusable: %s", ep.name, err)
            found[ep.name] = ProfileEntry(ep.name, None, None, f"{type(err).__name__}: {err}")
    return found


def resolve_profile(name_or_path: str) -> tuple[Path, Manifest]:
    """A profile by installed name, or a directory holding a manifest; sha256s are verified."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate, read_manifest(candidate)
    entry = discover_profiles().get(name_or_path)
    if entry is None:
        known = ", ".join(sorted(discover_profiles())) or "none installed"
        raise ManifestError(f"unknown profile {name_or_path!r}; installed profiles: {known}; or give a directory")
    if entry.directory is None:
        raise ManifestError(f"profile {name_or_path!r} is broken: {entry.error}")
    return entry.directory, read_manifest(entry.directory)
