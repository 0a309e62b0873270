"""SerialEM ``.mdoc`` files: parse them and turn a section's keys into frame metadata.

An mdoc is an IMOD autodoc: ``key = value`` lines, a global part, then one ``[ZValue = N]``
section per image of the stack (plus ``[T = ...]`` title lines and, in newer versions,
``[FrameSet = N]`` sections, which are kept as global text and otherwise ignored).
SerialEM rewrites the whole file after each image (the previous version is renamed to
``<name>.mdoc~``), so a reader can briefly see no file or a partial one; `parse_mdoc` therefore
never fails on a cut-off last line, and the folder source decides when a section is complete.

`read_mdoc` refuses files above `MAX_MDOC_BYTES` before reading them (a SerialEM mdoc holds about
1 KB per image, so the limit is thousands of images; a 64 MB "mdoc" is not one and would stall
whoever parses it), and `no_sections_problem` says why a complete mdoc is unusable.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from latticewatch.errors import InputError
from latticewatch.io.jsonio import parse_timestamp

log = logging.getLogger(__name__)

_SECTION = re.compile(r"^\[\s*(\w+)\s*=\s*(.*?)\s*\]\s*$")
#: SerialEM writes two-digit years before 3.7 and four-digit ones after; both occur in archives.
_DATETIME_FORMATS = ("%d-%b-%y %H:%M:%S", "%d-%b-%Y %H:%M:%S")
#: Largest mdoc read; larger files are refused with `MdocError` without being read.
MAX_MDOC_BYTES = 8 * 2**20
#: The keys carried into frame metadata, with how each value is parsed.
_FLOAT_KEYS = ("PixelSpacing", "Magnification", "Defocus", "ExposureDose", "TiltAngle", "TimeStamp")


@dataclass(frozen=True)
class Mdoc:
    """A parsed mdoc: the global keys and each ``[ZValue = N]`` section's keys (raw strings)."""

    globals: dict[str, str] = field(default_factory=dict)
    sections: dict[int, dict[str, str]] = field(default_factory=dict)
    complete_last_line: bool = True  # False when the text stops in the middle of a line

    @property
    def last_z(self) -> int | None:
        return max(self.sections) if self.sections else None


def parse_mdoc(text: str) -> Mdoc:
    """Parse mdoc text into global keys and ZValue sections.

    Examples
    --------
    >>> doc = parse_mdoc("PixelSpacing = 1.5\\n\\n[ZValue = 0]\\nTiltAngle = 2\\n")
    >>> doc.globals["PixelSpacing"], doc.sections[0]["TiltAngle"]
    ('1.5', '2')
    """
    globals_: dict[str, str] = {}
    sections: dict[int, dict[str, str]] = {}
    current = globals_
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        match = _SECTION.match(line)
        if match:
            kind, value = match.groups()
            if kind == "ZValue" and value.isdigit():
                current = sections.setdefault(int(value), {})
            else:
                current = {}  # [T = ...] titles and [FrameSet = ...] sections: not per image
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key.strip()] = value.strip()
    return Mdoc(globals_, sections, complete_last_line=text.endswith("\n") or not text)


class MdocError(InputError):
    """An mdoc that cannot be used (too large, or no image section); the message names it and why."""


def read_mdoc(path: str | os.PathLike[str]) -> Mdoc:
    """Read and parse an mdoc, refusing one above `MAX_MDOC_BYTES` without reading it.

    Undecodable bytes become U+FFFD: a key SerialEM wrote is ASCII, the rest is kept as text.

    Raises
    ------
    FileNotFoundError
        It is not there (SerialEM renames the old one before writing the new one).
    MdocError
        It is larger than `MAX_MDOC_BYTES`.

    Examples
    --------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.mrc.mdoc")
    >>> _ = open(path, "w").write("PixelSpacing = 1.5\\n[ZValue = 0]\\n")
    >>> read_mdoc(path).last_z
    0
    """
    size = os.stat(path).st_size
    if size > MAX_MDOC_BYTES:
        raise MdocError(f"{os.fsdecode(path)}: {size} bytes is not an mdoc (at most {MAX_MDOC_BYTES} bytes are read); "
                        "its stack is analysed without it")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_mdoc(fh.read(MAX_MDOC_BYTES + 1))


def no_sections_problem(doc: Mdoc, name: str) -> str | None:
    """Why a complete (settled) mdoc cannot describe its stack, or None when it can.

    Examples
    --------
    >>> no_sections_problem(parse_mdoc("garbage\\x00\\x01"), "a.mrc.mdoc")
    'a.mrc.mdoc: no [ZValue = N] section (not a SerialEM mdoc?); its stack is analysed without it'
    """
    if doc.sections:
        return None
    return f"{name}: no [ZValue = N] section (not a SerialEM mdoc?); its stack is analysed without it"


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def parse_datetime(value: str) -> datetime | None:
    """SerialEM's ``DateTime`` (``04-Dec-19  10:38:23`` or ``04-Dec-2019  10:38:23``), local time.

    Examples
    --------
    >>> parse_datetime("04-Dec-19  10:38:23") == parse_datetime("04-Dec-2019 10:38:23")
    True
    """
    try:
        return parse_timestamp(value, _DATETIME_FORMATS)
    except ValueError:
        return None


@dataclass(frozen=True)
class SectionInfo:
    """What an mdoc section says about one image, ready to merge into a `Frame`."""

    meta: dict[str, Any]
    pixel_size_nm: float | None
    acquired_at: datetime | None


def section_info(doc: Mdoc, z: int) -> SectionInfo:
    """Metadata of section ``z``: numbers parsed, PixelSpacing Å → nm, DateTime parsed.

    Section keys override global ones (SerialEM repeats PixelSpacing in both). ``meta`` holds
    the parsed values of the documented keys plus ``raw`` with every key as written.

    Examples
    --------
    >>> doc = parse_mdoc("PixelSpacing = 1.2\\n[ZValue = 0]\\nStagePosition = 10.5 -3\\n"
    ...                  "DateTime = 04-Dec-2019  10:38:23\\nNavigatorLabel = 12-3\\n")
    >>> info = section_info(doc, 0)
    >>> info.pixel_size_nm, info.meta["StagePosition"], info.meta["NavigatorLabel"], info.acquired_at.year
    (0.12, [10.5, -3.0], '12-3', 2019)
    """
    keys = {**doc.globals, **doc.sections.get(z, {})}
    meta: dict[str, Any] = {"ZValue": z}
    for key in _FLOAT_KEYS:
        if key in keys:
            meta[key] = _number(keys[key])
    if "StagePosition" in keys:
        meta["StagePosition"] = [v for v in (_number(p) for p in keys["StagePosition"].split()) if v is not None]
    if "NavigatorLabel" in keys:
        meta["NavigatorLabel"] = keys["NavigatorLabel"]
    acquired = parse_datetime(keys["DateTime"]) if "DateTime" in keys else None
    if "DateTime" in keys:
        meta["DateTime"] = keys["DateTime"]
    meta["raw"] = keys
    spacing = meta.get("PixelSpacing")
    pixel_size_nm = spacing / 10.0 if spacing else None  # Å → nm; 0 means "not calibrated"
    return SectionInfo(meta, pixel_size_nm, acquired)


def format_section(z: int, keys: dict[str, Any]) -> str:
    """One ``[ZValue = N]`` section as SerialEM writes it (blank line, header, ``key = value``).

    Examples
    --------
    >>> format_section(3, {"TiltAngle": 0.0})
    '\\n[ZValue = 3]\\nTiltAngle = 0.0\\n'
    """
    body = "".join(f"{key} = {value}\n" for key, value in keys.items())
    return f"\n[ZValue = {z}]\n{body}"
