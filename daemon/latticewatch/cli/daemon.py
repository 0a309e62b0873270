"""Daemon commands: ``latticewatch run | demo | check-config | replay | events``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from latticewatch.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    add_profile,
    error,
    frame_side,
    non_negative_float,
    positive_float,
)
from latticewatch.cli.overrides import add_output_overrides, add_run_overrides, load_run_config, with_overrides
from latticewatch.errors import ConfigError, StateError

if TYPE_CHECKING:  # the parser is built for every command; the config models only to run one
    from collections.abc import Iterator

    from latticewatch.config import Config
    from latticewatch.frame import Frame
    from latticewatch.testing.demo_score import DemoScore, Truth

#: What ``events --topic`` accepts (``latticewatch.`` prefix optional): the event types, and
#: ``defect`` for particles labelled stacking_fault.
EVENT_TOPICS = ("frame", "particle", "defect", "error", "warning")

#: The demo's folder source and the SerialEM stack it replays into: frame ids are ``demo:demo.mrc#<section>``.
DEMO_SOURCE, DEMO_STACK = "demo", "demo.mrc"


def topic_arg(text: str) -> str:
    """``--topic``: one of `EVENT_TOPICS`, with or without the ``latticewatch.`` prefix."""
    topic = text.removeprefix("latticewatch.")
    if topic not in EVENT_TOPICS:
        raise argparse.ArgumentTypeError(f"unknown topic {text!r}; topics are {', '.join(EVENT_TOPICS)}")
    return topic


def replay_source(text: str) -> str:
    """``replay SRC``: ``synthetic:N`` (N >= 1) or an existing folder of micrographs."""
    kind, colon, count = text.partition(":")
    if kind == "synthetic" and colon:
        if not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"synthetic:N needs a whole number of frames N >= 1, got {text!r}")
        return text
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder of micrographs, and not synthetic:N")
    return text


def demo_frames_arg(text: str) -> str:
    """``demo --frames``: ``shipped``, ``synthetic:N`` or an existing folder of labelled frames."""
    if text == "shipped":
        return text
    if text.startswith("synthetic:"):
        return replay_source(text)
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder of labelled frames, and not shipped or synthetic:N")
    return text


def _watching(config: Config) -> str:
    """What a daemon watches, one source per line: the folder's absolute path or the stream's address."""
    from latticewatch.config import FolderSourceConfig, ZmqSourceConfig

    lines = []
    for name, s in config.sources.items():
        if isinstance(s, FolderSourceConfig):
            what = f"{os.path.abspath(s.path)} (folder{', polling' if s.polling else ''})"
        elif isinstance(s, ZmqSourceConfig):
            what = f"{s.address} (ZeroMQ {s.socket}, {'binds' if s.bind else 'connects'})"
        else:
            what = f"{s.kind} (source plugin)"
        lines.append(f"  {name + ':':<10} {what}")
    return "\n".join(lines)


def _where(config: Config) -> str:
    """Where a running daemon's outputs can be reached, one per line."""
    lines = [f"  events:    {os.path.abspath(config.state_dir / 'events.jsonl')} (durable log)"]
    if config.events.enabled:
        lines.append(f"             {config.events.address} (ZeroMQ PUB, topics latticewatch.*)")
    if config.metrics.enabled:
        lines.append(f"  metrics:   http://{config.metrics.host}:{config.metrics.port}/metrics")
    if config.dashboard.enabled:
        lines.append(f"  dashboard: http://{config.dashboard.host}:{config.dashboard.port}/")
    return "\n".join(lines)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_run_config(args)
    print(f"{args.config if args.config is not None else 'the defaults'}: ok")
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from latticewatch.runtime import progress
    from latticewatch.runtime.daemon import run_daemon, stop_on_signals

    config = load_run_config(args)  # before the banner: a run that cannot start says why, and nothing else
    stop = threading.Event()
    stop_on_signals(stop)
    archive = os.path.abspath(config.archive_root) if config.archive.enabled else "off"
    print(f"latticewatch: profile {config.profile}, watching (Ctrl-C stops)\n{_watching(config)}\n{_where(config)}\n"
          f"  archive:   {archive}", file=sys.stderr, flush=True)
    # the status lines show at the default verbosity; the per-frame lines at -v
    logging.getLogger(progress.__name__).setLevel(logging.INFO)
    reporter = progress.ProgressReporter(per_frame=args.verbose >= 1, interval_s=args.status_interval)
    try:
        stats = run_daemon(config, stop, sinks=[reporter], reload=lambda: load_run_config(args))  # on SIGHUP
    finally:
        reporter.close()
    print(json.dumps(stats.as_dict(), indent=2), file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from latticewatch.testing.replay import SHIPPED_FRAMES, demo_frames

    count, frames = demo_frames(args.frames, shape=(args.size, args.size), pixel_size_nm=args.pixel_size_nm,
                                seed=args.seed)
    if args.frames == "shipped":
        what = f"{count} labelled abTEM frames shipped with latticewatch ({SHIPPED_FRAMES})"
    elif args.frames.startswith("synthetic:"):
        what = f"{count} synthetic {args.size}² frames of the analytic generator"
    else:
        what = f"{count} labelled frames of {args.frames}"
    temporary = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="latticewatch-demo-")) if temporary else Path(args.dir)
    try:
        return _demo(args, root, what, count, frames)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"  removed {root} (--keep keeps it)", file=sys.stderr if args.json else sys.stdout)


def _demo(args: argparse.Namespace, root: Path, what: str, count: int, frames: Iterator[tuple[Frame, Truth]]) -> int:
    """`cmd_demo` once the frames and the folder are known: the daemon and the replay, then the summary."""
    from latticewatch.config import parse_config
    from latticewatch.runtime.daemon import run_daemon, stop_on_signals
    from latticewatch.testing.demo_score import DemoScore, format_summary

    incoming = root / "incoming"
    config = with_overrides(parse_config({
        "profile": args.profile,
        "data_dir": str(root / "data"),
        "runtime": {"budget_ms": args.budget_ms},
        "sources": {DEMO_SOURCE: {"kind": "folder", "path": str(incoming), "settle_s": 0.5}},
    }), args)
    stop = threading.Event()
    stop_on_signals(stop)
    events = config.state_dir / "events.jsonl"
    # with --json, stdout holds the JSON alone
    pace = f"at {args.rate:g} Hz" if args.rate > 0 else "as fast as possible"
    print(f"latticewatch demo\n  replaying {what} {pace} into the SerialEM stack {incoming / DEMO_STACK} "
          f"(+ .mdoc)\n{_where(config)}\n"
          f"  ledger:    {config.state_dir / 'ledger.sqlite'}\n"
          f"  {'stops when all frames are analysed' if args.exit_when_done else 'Ctrl-C stops'}",
          file=sys.stderr if args.json else sys.stdout, flush=True)
    score = DemoScore()
    incoming.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_feed_demo, args=(args.rate, frames, incoming, score, stop), name="demo-replay",
                     daemon=True).start()
    if args.exit_when_done:
        threading.Thread(target=_stop_when_done, args=(config, count, stop), name="demo-done", daemon=True).start()
    started = time.monotonic()
    stats = run_daemon(config, stop, sinks=[score])
    elapsed = time.monotonic() - started
    summary = score.summary()
    if args.json:
        print(json.dumps({**stats.as_dict(), "summary": summary}, indent=2))
    else:
        print(f"{summary['frames_analysed']} frame(s) analysed in {elapsed:.1f} s; events in {events}\n"
              f"{format_summary(summary)}")
    return EXIT_OK


def _feed_demo(rate_hz: float, frames: Iterator[tuple[Frame, Truth]], incoming: Path, score: DemoScore,
               stop: threading.Event) -> None:
    """Replay the demo's frames into its SerialEM stack, handing each one's truth to ``score`` first."""
    from latticewatch.testing.replay import replay

    def announced() -> Iterator[Frame]:
        for section, (frame, truth) in enumerate(frames):
            score.expect(f"{DEMO_SOURCE}:{DEMO_STACK}#{section}", truth)  # the id the folder source gives it
            yield frame

    replay(announced(), rate_hz=rate_hz, to_folder=incoming, serialem_stack=DEMO_STACK, stop=stop)


def _stop_when_done(config: Config, n_frames: int, stop: threading.Event) -> None:
    """Set ``stop`` once the ledger has every replayed frame finished (``demo --exit-when-done``)."""
    from latticewatch.runtime.ledger import Ledger

    ledger = None
    while not stop.is_set():
        time.sleep(0.2)
        if ledger is None and config.state_dir.joinpath("ledger.sqlite").exists():
            ledger = Ledger(config.state_dir / "ledger.sqlite")
        if ledger is not None:
            counts = ledger.counts()
            if counts["published"] + counts["archived"] + counts["quarantined"] >= n_frames:
                stop.set()
    if ledger is not None:
        ledger.close()


def cmd_replay(args: argparse.Namespace) -> int:
    from latticewatch.runtime.daemon import stop_on_signals
    from latticewatch.testing.replay import replay, source_frames

    if (args.to_folder is None) == (args.to_zmq is None):
        raise ConfigError("give exactly one of --to-folder DIR and --to-zmq ADDRESS")
    stop = threading.Event()
    stop_on_signals(stop)
    frames = source_frames(args.src, shape=(args.size, args.size), pixel_size_nm=args.pixel_size_nm, seed=args.seed)
    sent = replay(frames, rate_hz=args.rate, to_folder=args.to_folder, serialem_stack=args.serialem_stack,
                  fmt=args.format, to_zmq=args.to_zmq, zmq_socket=args.zmq_socket, series=args.series, stop=stop)
    print(f"{sent} frame(s) replayed", file=sys.stderr)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from latticewatch.config import load_config
    from latticewatch.runtime.eventlog import read_log, rotated_files

    state = args.state if args.state is not None else load_config(args.config).state_dir
    path = Path(state) / "events.jsonl"
    if not path.exists() and not rotated_files(path):
        raise StateError(f"no event log at {path}")
    if args.follow:  # Ctrl-C ends it even when started from a shell that ignores SIGINT in background jobs
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for line in read_log(path, since=args.since, types=args.topic or (), follow=args.follow):
            sys.stdout.write(line)
            if args.follow:  # a pipe reader sees each event as it comes
                sys.stdout.flush()
    except KeyError as err:  # an id the log does not hold: nothing to replay after it
        error(err.args[0])
        return EXIT_SOME_FAILED
    except KeyboardInterrupt:  # how --follow ends
        pass
    sys.stdout.flush()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``demo``, ``check-config``, ``replay`` and ``events`` to the ``latticewatch`` command."""
    p = sub.add_parser("run", help="run the daemon (folder watching, ZeroMQ streams)",
                       description="Watch the configured sources and analyse every frame exactly once; the ledger, "
                       "event log, spool and quarantine live in <data_dir>/state. SIGINT/SIGTERM finish the frames in "
                       "flight and stop. Without --config: watch ./incoming, data in ./latticewatch-data. Precedence: "
                       "command line > config file > defaults (the options below override the config's keys). Before "
                       "anything starts, the config is checked as check-config does: the profile must verify and every "
                       "watched folder exist (it is never created). Progress goes to stderr: a status line every 10 s "
                       "while frames arrive, and a line per frame with latticewatch -v run.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML config, see the README (default: none, all defaults)")
    add_run_overrides(p)
    p.add_argument("--status-interval", type=non_negative_float, default=None, metavar="S",
                   help="seconds between status lines on stderr while frames arrive or wait; 0 = none (default: 10)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file as run would, without starting",
                       description="Validate a TOML config and the options over it exactly as run does (schema, "
                       "profile and its model files, watched folders, source plugins); print the effective config "
                       "(defaults filled in) or every problem, naming the file and key.")
    p.add_argument("config", type=Path, nargs="?", default=None, metavar="FILE",
                   help="the TOML config (default: none, the defaults run uses without --config)")
    add_run_overrides(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="daemon + SerialEM-style replay of labelled frames in a temporary folder",
                       description="Start the daemon on a temporary folder and replay labelled frames into it the way "
                       "SerialEM writes a stack (by default the abTEM frames shipped with latticewatch); print where "
                       "the events, metrics and dashboard are, and at the end what the daemon found next to the truth "
                       "of the frames (particles, coverage, defect fraction, Dice of its particle masks). Ctrl-C "
                       "stops cleanly. If a port is taken (another daemon?), pick others with the options below.")
    p.add_argument("--frames", type=demo_frames_arg, default="shipped", metavar="shipped|synthetic:N|DIR",
                   help="what to replay: the shipped labelled abTEM frames, N frames of the analytic generator "
                   "(--size, --pixel-size-nm, --seed), or a folder written by latticewatch simulate "
                   "(default: %(default)s)")
    _add_frame_options(p, rate_hz=2.0)
    add_profile(p)
    p.add_argument("--budget-ms", type=float, default=2000.0,
                   help="per-frame processing budget in ms (default: %(default)s)")
    p.add_argument("--dir", type=Path, default=None,
                   help="keep everything in this folder (default: a new temporary folder, printed at the start and "
                   "removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (events, ledger, archive)")
    p.add_argument("--exit-when-done", action="store_true", help="stop once every replayed frame is analysed")
    p.add_argument("--json", action="store_true",
                   help="end with the run's statistics as JSON on stdout, the summary under \"summary\" (default: "
                   "the summary table: particles, coverage, defect fraction, flagged frames, Dice against the truth)")
    add_output_overrides(p)
    p.set_defaults(func=cmd_demo)

    _register_replay_and_events(sub)


def _add_frame_options(p: argparse.ArgumentParser, *, rate_hz: float) -> None:
    """``--rate``, ``--size``, ``--pixel-size-nm`` and ``--seed``: the pace and the synthetic frames (``synthetic:N``)
    of ``demo`` and ``replay``."""
    p.add_argument("--rate", type=float, default=rate_hz,
                   help="frames per second (default: %(default)s; 0 = as fast as possible)")
    p.add_argument("--size", type=frame_side, default=512, metavar="PX",
                   help="side of the synthetic frames in pixels (default: %(default)s)")
    p.add_argument("--pixel-size-nm", type=positive_float, default=0.05,
                   help="pixel size of the synthetic frames (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic frames (default: %(default)s)")


def _register_replay_and_events(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="emulate SerialEM or a camera: write frames to a folder or a ZeroMQ stream",
                       description="Replay SRC (a folder of micrographs, or synthetic:N) at --rate frames per second: "
                       "into a SerialEM-style growing stack + .mdoc (--serialem-stack NAME), as one file per frame, or "
                       "over ZeroMQ in latticewatch's native protocol (--to-zmq, a bound PUSH or PUB socket).")
    p.add_argument("src", type=replay_source, metavar="SRC", help="folder of micrographs, or synthetic:N")
    p.add_argument("--to-folder", type=Path, default=None, metavar="DIR", help="write the frames into this folder")
    p.add_argument("--serialem-stack", default=None, metavar="NAME",
                   help="append to this MRC stack (e.g. grid1.mrc) with its .mdoc (default: one file per frame)")
    p.add_argument("--format", choices=("mrc", "tif"), default="mrc",
                   help="one-file-per-frame format (default: %(default)s)")
    p.add_argument("--to-zmq", default=None, metavar="ADDRESS", help="bind this endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--zmq-socket", choices=("push", "pub"), default="push",
                   help="ZeroMQ socket type (default: %(default)s)")
    p.add_argument("--series", default=None, help="stream series id (default: replay-<time>)")
    _add_frame_options(p, rate_hz=1.0)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("events", help="replay the durable event log (JSON lines) since a time or an event id",
                       description="Print the events of <state>/events.jsonl and its rotated files "
                       "(events.jsonl.000001[.gz] …, oldest first) as JSON lines, exactly as logged: all, or "
                       "those after an event id, or those rendered at or after an ISO 8601 time (UTC when no zone is "
                       "given); with --follow, then every event appended, across rotations, until Ctrl-C. For a "
                       "dashboard that restarts or a subscriber that joined late. Exit code 1 if the event id is not "
                       "in the log (the message says when retention removed older events); a time older than what "
                       "retention kept is a warning.")
    p.add_argument("--since", default=None, metavar="TIME|ID",
                   help="ISO 8601 time (e.g. 2024-06-01T10:00:00Z) or event id (default: from the start)")
    p.add_argument("--topic", type=topic_arg, action="append", metavar="TOPIC",
                   help=f"{', '.join(EVENT_TOPICS)} (latticewatch.* accepted); repeatable (default: all)")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing events as they are appended, across rotations, until Ctrl-C (like tail -F)")
    p.add_argument("--state", type=Path, default=None, metavar="DIR", help="state directory (default: from --config)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="TOML config whose state directory to read (default: none, ./latticewatch-data/state)")
    p.set_defaults(func=cmd_events)
