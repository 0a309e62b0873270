"""The batch path: files → frames → analyses, one frame after another, every failure reported.

``latticewatch process``, ``sort``, ``evaluate``, ``calibrate int8-set`` and ``bench`` run their
frames through `Batch`, so they all read and fail by the same rule:

* a file that cannot be opened or read at all is **one** failure, with ``frame_id`` ``None``;
* a bad section of a stack is one failure with frame id ``<path>#<section>``, and the sections
  after it are still read (`~latticewatch.io.readers.read_frames` resumes at ``section + 1``);
* a frame the analysis refuses (`~latticewatch.errors.FrameError`: too small, NaN pixels …) is one
  failure with its frame id;
* anything else — a lost model, a full output disk, a bug — is not about one frame and stops the
  batch.

Frames whose files carry no pixel size get it from an instrument calibration when one is given,
exactly as the daemon does. The daemon itself uses the runners (`latticewatch.runtime.runners`):
they add the ledger, queues and sinks a live session needs; a batch needs none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from latticewatch.errors import FrameError, InputError
from latticewatch.frame import Frame

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """A file or frame that could not be read or analysed, as every command reports it.

    ``file`` is the path as the caller named it; ``frame_id`` is ``None`` when the whole file
    failed, ``<path>#<section>`` for one section of a stack, else the frame's id; ``error`` names
    the file or frame and says what is wrong.

    Examples
    --------
    >>> Failure("stack.mrc", "stack.mrc#1", "stack.mrc#1: 3 NaN/Inf pixels").as_dict()["frame_id"]
    'stack.mrc#1'
    """

    file: str
    frame_id: str | None
    error: str

    def as_dict(self) -> dict[str, str | None]:
        """The JSON form (``{"file", "frame_id", "error"}``) used by every command's ``--json``."""
        return asdict(self)


def micrograph_files(directory: Path) -> list[Path]:
    """Readable micrographs directly in ``directory`` (by suffix), sorted by name; dotfiles skipped.

    Raises
    ------
    InputError
        When ``directory`` is not a directory.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.mrc", "a.tif", ".hidden.mrc", "notes.txt"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> [p.name for p in micrograph_files(folder)]
    ['a.tif', 'b.mrc']
    """
    from latticewatch.io.readers import SUPPORTED_SUFFIXES

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_SUFFIXES)


class Batch:
    """One pass over files: their frames, analysed by a function of the caller's, failures collected.

    Parameters
    ----------
    permissive
        Readers warn and guess on inconsistent headers instead of failing.
    calibration
        Instrument calibration TOML giving frames without a pixel size one, by magnification.
    on_failure
        Called with each `Failure` as it happens (the command line prints it).
    progress
        Show a progress bar over the files on stderr (the command line passes whether stderr is
        a terminal); never shown for a single file.
    desc
        Label of the progress bar.

    Attributes
    ----------
    failures
        Every `Failure` so far, in order.

    Raises
    ------
    CalibrationError
        When ``calibration`` cannot be read.

    Examples
    --------
    >>> from latticewatch.runtime.analyser import Analyser  # doctest: +SKIP
    >>> batch = Batch(calibration=Path("calibration/scope.toml"))  # doctest: +SKIP
    >>> for frame, analysis in batch.run([Path("stack.mrc")], Analyser().analyse):  # doctest: +SKIP
    ...     print(frame.frame_id, len(analysis.regions))
    stack.mrc#0 4
    stack.mrc#2 7
    >>> batch.failures  # doctest: +SKIP
    [Failure(file='stack.mrc', frame_id='stack.mrc#1', error='stack.mrc#1: 3 NaN/Inf pixels')]
    """

    def __init__(self, *, permissive: bool = False, calibration: Path | None = None,
                 on_failure: Callable[[Failure], None] | None = None, progress: bool = False,
                 desc: str = "files") -> None:
        from latticewatch.calibration import load_calibration

        self.permissive = permissive
        self.calibration = load_calibration(calibration) if calibration is not None else None
        self.calibration_name = Path(calibration).name if calibration is not None else ""
        self.on_failure = on_failure
        self.progress = progress
        self.desc = desc
        self.failures: list[Failure] = []

    def fail(self, file: str | Path, frame_id: str | None, error: object) -> None:
        """Record a failure (also for the caller's own steps after the analysis, e.g. archiving)."""
        failure = Failure(str(file), frame_id, str(error))
        log.debug("failed: %s", failure)
        self.failures.append(failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    def frames(self, files: Sequence[Path]) -> Iterator[Frame]:
        """Every readable frame of ``files`` in order, calibrated; the unreadable become failures."""
        from tqdm import tqdm

        from latticewatch.calibration import apply_calibration

        for path in tqdm(files, desc=self.desc, unit="file", disable=not self.progress or len(files) < 2):
            for frame in self._frames_of(path):
                if self.calibration is not None:
                    frame = apply_calibration(frame, self.calibration, self.calibration_name)
                yield frame

    def _frames_of(self, path: Path) -> Iterator[Frame]:
        from latticewatch.io.readers import ReadError, read_frames

        start = 0
        while True:
            try:
                yield from read_frames(path, permissive=self.permissive, start=start)
                return
            except OSError as err:  # the filesystem failed (missing file, permission): the whole file
                self.fail(path, None, f"{path}: {err.strerror or err}")
                return
            except ReadError as err:
                self.fail(path, None if err.section is None else f"{path}#{err.section}", err)
                if err.section is None or err.section < start:  # the whole file is bad (or would fail again)
                    return
                start = err.section + 1

    def analyse(self, frames: Iterable[Frame], analyse: Callable[[Frame], T]) -> Iterator[tuple[Frame, T]]:
        """``(frame, analyse(frame))`` for each frame; a `FrameError` is that frame's failure."""
        for frame in frames:
            try:
                result = analyse(frame)
            except FrameError as err:
                self.fail(frame.origin or frame.frame_id, frame.frame_id, err)
                continue
            yield frame, result

    def run(self, files: Sequence[Path], analyse: Callable[[Frame], T]) -> Iterator[tuple[Frame, T]]:
        """`frames` of ``files`` through `analyse`: the whole batch path."""
        return self.analyse(self.frames(files), analyse)
