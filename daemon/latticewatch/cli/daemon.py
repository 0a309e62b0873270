"""Daemon commands: ``latticewatch run | demo | check-config | replay | events``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("latticewatch.cli.daemon")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _load(path: Path | None):
    from latticewatch.errors import ConfigError
    from latticewatch.config import load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(f"error: invalid config\n{err}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    print(f"{args.config}: ok")
    print(json.dumps(config.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _run(config, stop: threading.Event) -> int:
    from latticewatch.models.manifest import ManifestError
    from latticewatch.runtime.daemon import SourceUnavailable, run_daemon

    try:
        stats = run_daemon(config, stop)
    except (ManifestError, SourceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    summary = stats.as_dict()
    print(json.dumps(summary, indent=2), file=sys.stderr)
    return EXIT_OK


def _where(config) -> str:
    """Where a running daemon's outputs can be reached, one per line."""
    lines = [f"  events:    {config.state_dir / 'events.jsonl'} (durable log)"]
    if config.events.enabled:
        lines.append(f"             {config.events.address} (ZeroMQ PUB, topics latticewatch.*)")
    if config.metrics.enabled:
        lines.append(f"  metrics:   http://{config.metrics.host}:{config.metrics.port}/metrics")
    if config.dashboard.enabled:
        lines.append(f"  dashboard: http://{config.dashboard.host}:{config.dashboard.port}/")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from latticewatch.runtime.daemon import stop_on_signals

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    stop = threading.Event()
    stop_on_signals(stop)
    print(f"latticewatch: watching {', '.join(config.sources)} (Ctrl-C stops)\n{_where(config)}", file=sys.stderr, flush=True)
    return _run(config, stop)


def cmd_demo(args: argparse.Namespace) -> int:
    from latticewatch.config import parse_config
    from latticewatch.runtime.daemon import stop_on_signals
    from latticewatch.runtime.ledger import Ledger
    from latticewatch.testing.replay import replay, source_frames

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="latticewatch-demo-"))
    incoming = root / "incoming"
    config = parse_config({
        "profile": args.profile,
        "data_dir": str(root / "data"),
        "runtime": {"budget_ms": args.budget_ms},
        "sources": {"demo": {"kind": "folder", "path": str(incoming), "settle_s": 0.5}},
    })
    stop = threading.Event()
    stop_on_signals(stop)
    events = config.state_dir / "events.jsonl"
    print(f"latticewatch demo\n  replaying {args.frames} synthetic {args.size}² frames at {args.rate} Hz into the SerialEM stack "
          f"{incoming / 'demo.mrc'} (+ .mdoc)\n{_where(config)}\n  ledger:    {config.state_dir / 'ledger.sqlite'}\n"
          f"  {'stops when all frames are analysed' if args.exit_when_done else 'Ctrl-C stops'}", flush=True)

    def feed() -> None:
        frames = source_frames(f"synthetic:{args.frames}", shape=(args.size, args.size), pixel_size_nm=args.pixel_size_nm, seed=args.seed)
        replay(frames, rate_hz=args.rate, to_folder=incoming, serialem_stack="demo.mrc", stop=stop)

    def wait_until_done() -> None:
        ledger = None
        while not stop.is_set():
            time.sleep(0.2)
            if ledger is None and config.state_dir.joinpath("ledger.sqlite").exists():
                ledger = Ledger(config.state_dir / "ledger.sqlite")
            if ledger is not None:
                counts = ledger.counts()
                if counts["published"] + counts["archived"] + counts["quarantined"] >= args.frames:
                    stop.set()
        if ledger is not None:
            ledger.close()

    incoming.mkdir(parents=True, exist_ok=True)
    threading.Thread(target=feed, name="demo-replay", daemon=True).start()
    if args.exit_when_done:
        threading.Thread(target=wait_until_done, name="demo-done", daemon=True).start()
    started = time.monotonic()
    code = _run(config, stop)
    elapsed = time.monotonic() - started
    n = sum(1 for line in events.open() if '"type":"frame"' in line) if events.exists() else 0
    print(f"{n} frame(s) analysed in {elapsed:.1f} s; events in {events}")
    return code


def cmd_replay(args: argparse.Namespace) -> int:
    from latticewatch.testing.replay import replay, source_frames

    if (args.to_folder is None) == (args.to_zmq is None):
        print("error: give exactly one of --to-folder DIR and --to-zmq ADDRESS", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()
    from latticewatch.runtime.daemon import stop_on_signals

    stop_on_signals(stop)
    try:
        frames = source_frames(args.src, shape=(args.size, args.size), pixel_size_nm=args.pixel_size_nm, seed=args.seed)
        sent = replay(frames, rate_hz=args.rate, to_folder=args.to_folder, serialem_stack=args.serialem_stack, fmt=args.format,
                      to_zmq=args.to_zmq, zmq_socket=args.zmq_socket, series=args.series, stop=stop)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{sent} frame(s) replayed", file=sys.stderr)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from latticewatch.sinks.events import read_log

    if args.state is not None:
        state = args.state
    else:
        config = _load(args.config)
        if config is None:
            return EXIT_USAGE
        state = config.state_dir
    path = Path(state) / "events.jsonl"
    if not path.exists():
        print(f"error: no event log at {path}", file=sys.stderr)
        return EXIT_USAGE
    topics = [t.removeprefix("latticewatch.") for t in args.topic or ()]
    try:
        for line in read_log(path, since=args.since, types=topics):
            sys.stdout.write(line)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `latticewatch events ... | head`
        return EXIT_OK
    sys.stdout.flush()
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``, ``demo``, ``check-config`` and ``replay`` to the ``latticewatch`` command."""
    p = sub.add_parser("run", help="run the daemon (folder watching, ZeroMQ streams)",
                       description="Watch the configured sources and analyse every frame exactly once; the ledger, "
                       "event log, spool and quarantine live in <data_dir>/state. SIGINT/SIGTERM finish the frames in "
                       "flight and stop. Without --config: watch ./incoming, data in ./latticewatch-data.")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML config (see the README)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file without starting",
                       description="Validate a TOML config; print the effective config (defaults filled in) or every problem.")
    p.add_argument("config", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("demo", help="daemon + SerialEM-style replay of synthetic frames in a temporary folder",
                       description="Start the daemon on a temporary folder and replay synthetic frames into it the way "
                       "SerialEM writes a stack; print where the events are. Ctrl-C stops cleanly.")
    p.add_argument("--frames", type=int, default=20, help="synthetic frames to replay (default: %(default)s)")
    p.add_argument("--rate", type=float, default=2.0, help="frames per second (default: %(default)s; 0 = as fast as possible)")
    p.add_argument("--size", type=int, default=512, help="frame side in pixels (default: %(default)s)")
    p.add_argument("--pixel-size-nm", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="nanoparticles")
    p.add_argument("--budget-ms", type=float, default=2000.0)
    p.add_argument("--dir", type=Path, default=None, help="use this folder instead of a temporary one")
    p.add_argument("--exit-when-done", action="store_true", help="stop once every replayed frame is analysed")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("replay", help="emulate SerialEM or a camera: write frames to a folder or a ZeroMQ stream",
                       description="Replay SRC (a folder of micrographs, or synthetic:N) at --rate frames per second: "
                       "into a SerialEM-style growing stack + .mdoc (--serialem-stack NAME), as one file per frame, or "
                       "over ZeroMQ in latticewatch's native protocol (--to-zmq, a bound PUSH or PUB socket).")
    p.add_argument("src", metavar="SRC", help="folder of micrographs, or synthetic:N")
    p.add_argument("--to-folder", type=Path, default=None, metavar="DIR")
    p.add_argument("--serialem-stack", default=None, metavar="NAME", help="append to this MRC stack (e.g. grid1.mrc) with its .mdoc")
    p.add_argument("--format", choices=("mrc", "tif"), default="mrc", help="one-file-per-frame format (default: %(default)s)")
    p.add_argument("--to-zmq", default=None, metavar="ADDRESS", help="bind this endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--zmq-socket", choices=("push", "pub"), default="push")
    p.add_argument("--series", default=None, help="stream series id (default: replay-<time>)")
    p.add_argument("--rate", type=float, default=1.0, help="frames per second (default: %(default)s; 0 = as fast as possible)")
    p.add_argument("--size", type=int, default=512, help="synthetic frame side (default: %(default)s)")
    p.add_argument("--pixel-size-nm", type=float, default=0.05, help="synthetic pixel size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("events", help="replay the durable event log (JSON lines) since a time or an event id",
                       description="Print the events of <state>/events.jsonl as JSON lines, exactly as logged: all, or "
                       "those after an event id, or those rendered at or after an ISO 8601 time (UTC when no zone is "
                       "given). For a dashboard that restarts or a subscriber that joined late.")
    p.add_argument("--since", default=None, metavar="TIME|ID", help="ISO 8601 time (e.g. 2024-06-01T10:00:00Z) or event id")
    p.add_argument("--topic", action="append", metavar="TOPIC",
                   help="frame, particle, defect, error or warning (latticewatch.* accepted); repeatable; default all")
    p.add_argument("--state", type=Path, default=None, metavar="DIR", help="state directory (default: from --config)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML config whose state directory to read")
    p.set_defaults(func=cmd_events)
