"""What every command shares: the exit codes, the error lines, progress, and the options that must agree.

The error policy itself lives in `latticewatch.cli.main`: a command raises a
`~latticewatch.errors.LatticewatchError` (or an `OSError` on a path the user named) and ``main``
turns it into one ``error: <message>`` line on stderr and `EXIT_USAGE`. Commands return
`EXIT_SOME_FAILED` when they did their work but some files or frames failed; each failure has
already been printed as an ``error:`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.errors import ConfigError
from latticewatch.frame import MIN_SIDE_PX

if TYPE_CHECKING:  # the parser is built for every command; the batch path is imported only to run one
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.runtime.batch import Batch, Failure

#: Everything asked for was done.
EXIT_OK = 0
#: Done, but some files or frames failed; each is named on stderr (and in ``--json``).
EXIT_SOME_FAILED = 1
#: Nothing (more) was done: a user error — an option, a file, a profile, a config — named on stderr.
EXIT_USAGE = 2

DEFAULT_PROFILE = "nanoparticles"
BASELINE_NAMES = ("otsu", "fourier", "bragg")


def error(message: object) -> None:
    """Print ``error: <message>`` on stderr (a message of several problems: one line each).

    Examples
    --------
    >>> import contextlib, io
    >>> with contextlib.redirect_stderr(io.StringIO()) as err:
    ...     error("a.toml: runtime.queue_size: must be >= 1")
    >>> err.getvalue()
    'error: a.toml: runtime.queue_size: must be >= 1\\n'
    """
    for line in str(message).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)


def describe(err: BaseException) -> str:
    """The message of an error for a person: an `OSError` as ``<path>: <reason>``.

    >>> describe(FileNotFoundError(2, "No such file or directory", "x.mrc"))
    'x.mrc: No such file or directory'
    """
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def fail(err: BaseException) -> int:
    """The one error policy: ``error: <message>`` on stderr; returns `EXIT_USAGE`."""
    error(describe(err))
    return EXIT_USAGE


def report_failure(failure: Failure) -> None:
    """Print one failed file or frame as it happens (``Batch(on_failure=report_failure)``)."""
    error(failure.error)


def open_batch(args: argparse.Namespace, desc: str = "files") -> tuple[Analyser, Batch]:
    """The profile's analyser and the batch path as `add_profile`, `add_batch_options` and `add_backend` set them.

    Failures are printed as they happen; a progress bar named ``desc`` shows on a terminal.

    Examples
    --------
    >>> analyser, batch = open_batch(args, "sort")  # doctest: +SKIP
    """
    from latticewatch.runtime.analyser import Analyser
    from latticewatch.runtime.batch import Batch

    analyser = Analyser(args.profile, backend=args.backend, threads=args.threads, classifier=args.classifier)
    batch = Batch(permissive=args.permissive, calibration=args.calibration, on_failure=report_failure,
                  progress=progress_enabled(), desc=desc)
    return analyser, batch


def exit_code(failures: list) -> int:
    """`EXIT_SOME_FAILED` when anything failed, else `EXIT_OK`."""
    return EXIT_SOME_FAILED if failures else EXIT_OK


def progress_enabled() -> bool:
    """Progress bars go to stderr, and only when it is a terminal (never into a log file)."""
    return sys.stderr.isatty()


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for the manifests and data sets that record how they were made, with its
    absolute paths made relative (`latticewatch.models.manifest.recorded_command`) to the data set it read:
    the folder holding ``--images``, the data set of a ``--crops`` index (``DIR/crops/index.csv``), or
    the folder of an imported weight file."""
    from latticewatch.models.manifest import recorded_command

    dataset = None
    if getattr(args, "images", None) is not None:
        dataset = Path(args.images).parent
    elif getattr(args, "crops", None) is not None:
        dataset = Path(args.crops).parent.parent
    elif isinstance(getattr(args, "file", None), Path):
        dataset = args.file.parent
    return recorded_command(getattr(args, "argv", None) or [], dataset)


def print_confusion(rows: list[str], columns: list[str], matrix: list[list[int]]) -> None:
    """A classifier's confusion matrix on stdout: a row per true class, a column per label.

    >>> print_confusion(["stacking_fault", "empty"], ["stacking_fault", "empty"], [[3, 1], [0, 4]])
    confusion matrix on the held-out crops (rows: true class, columns: label)
                            SF       empty
    stacking_fault           3           1
    empty                    0           4
    """
    short = [c.replace("no_stacking_fault", "no SF").replace("stacking_fault", "SF")[:10] for c in columns]
    width = max(len(r) for r in rows)
    print("confusion matrix on the held-out crops (rows: true class, columns: label)")
    print(" " * width + "  " + "  ".join(f"{s:>10}" for s in short))
    for name, row in zip(rows, matrix):
        print(f"{name:<{width}}  " + "  ".join(f"{v:>10d}" for v in row))


@contextlib.contextmanager
def needs_extra(what: str, extra: str = "train", package: str = "torch") -> Iterator[None]:
    """Turn an `ImportError` inside the block into ``<what> needs the [<extra>] extra``.

    Examples
    --------
    >>> with needs_extra("models import-keras"):  # doctest: +SKIP
    ...     import torch
    Traceback (most recent call last):
    ...
    latticewatch.errors.ConfigError: models import-keras needs the [train] extra: pip install '.[train]' (torch ...)
    """
    try:
        yield
    except ImportError as err:
        raise ConfigError(f"{what} needs the [{extra}] extra: pip install '.[{extra}]' "
                          f"({package} cannot be imported: {err})") from err


# ----------------------------------------------------------------------------- shared options


def _number(text: str, kind: type[int] | type[float], what: str) -> int | float:
    """``text`` as ``kind``; an option's error when it is not one (``what``: what was expected)."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def frame_side(text: str) -> int:
    """A frame side the analyser accepts (``bench --sizes``, ``demo --size``)."""
    side = _number(text, int, "a frame side in pixels")
    if side < MIN_SIDE_PX:
        raise argparse.ArgumentTypeError(f"frame side must be at least {MIN_SIDE_PX} px, got {side}")
    return side


def positive_float(text: str) -> float:
    """A number > 0 (``--pixel-size-nm``)."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (``run --status-interval``, where 0 turns something off)."""
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (counts: ``--repeats``, ``--frames``)."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_profile(p: argparse.ArgumentParser, *, text: str = "installed profile name or profile directory") -> None:
    """``--profile``, with the same default in every command."""
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"{text} (default: %(default)s)")


def add_threads(p: argparse.ArgumentParser, what: str = "inference threads") -> None:
    """``--threads``: ``None`` lets the backend use every usable core."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help=f"{what} (default: all usable cores)")


def add_backend(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """``--backend``: which inference backend runs the networks (``None``: the config's ``[runtime] backend``).

    The names are `latticewatch.models.backends.BACKEND_CHOICES`, written out here so that building the
    parser imports no backend code.
    """
    p.add_argument("--backend", choices=("auto", "tensorrt", "cuda", "openvino", "onnxruntime"), default=default,
                   help="inference backend; auto: TensorRT, else torch on CUDA, else the CPU default, whichever runs "
                   "here first (`latticewatch models list` says which can run and why not) "
                   + ("(default: %(default)s)" if default else "(default: from the config, auto)"))


def add_report_options(p: argparse.ArgumentParser) -> None:
    """``--save-probabilities`` and ``--json``: what `process` and `batch` write beside the per-frame reports."""
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write DIR/<name>_probability.npy (float32, frame size)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def add_batch_options(p: argparse.ArgumentParser) -> None:
    """``--permissive``, ``--calibration`` and ``--threads``: how the batch path reads and analyses files."""
    p.add_argument("--permissive", action="store_true",
                   help="warn and guess on inconsistent headers instead of failing")
    p.add_argument("--calibration", type=Path, default=None, metavar="TOML",
                   help="instrument calibration (magnification → pixel size) for frames whose files carry no "
                   "pixel size")
    p.add_argument("--classifier", choices=("profile", "baseline"), default="profile",
                   help="the profile's classifier, or the baseline kept beside it (the paper's forest beside the "
                   "CNN in nanoparticles) (default: %(default)s)")
    add_threads(p)


def add_baselines(p: argparse.ArgumentParser, default: tuple[str, ...], text: str) -> None:
    """``--baselines NAME [NAME ...]`` (commas accepted too, ``none`` for none): the same in every command.

    The names are checked when the command runs (`baseline_names`), so building the parser imports
    no training code.
    """
    p.add_argument("--baselines", nargs="+", default=list(default) or ["none"], metavar="NAME",
                   help=f"{text}: {', '.join(BASELINE_NAMES)}, or none; space- or comma-separated "
                   f"(default: {' '.join(default) or 'none'})")


def baseline_names(values: list[str]) -> list[str]:
    """The baselines asked for with ``--baselines``: names in order, ``none`` → none.

    Examples
    --------
    >>> baseline_names(["otsu,bragg"]), baseline_names(["otsu", "bragg"]), baseline_names(["none"])
    (['otsu', 'bragg'], ['otsu', 'bragg'], [])
    """
    from latticewatch.training.assess.evaluate import parse_baselines

    return parse_baselines(",".join(values))
