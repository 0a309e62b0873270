"""The config a daemon command runs with: the TOML file (or the defaults), the command-line options over it, checked.

Precedence: command line > config file > defaults. ``run`` and ``check-config`` build their config
with `load_run_config`, so a config that checks out starts; ``demo`` takes the output options
(`add_output_overrides`) over its own config.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latticewatch.cli.common import DEFAULT_PROFILE, add_backend
from latticewatch.errors import ConfigError

if TYPE_CHECKING:  # the parser is built for every command; the config models only to run one
    from latticewatch.config import Config, SourceConfig

#: Options that override config keys without editing the TOML: dest → the keys it sets. ``--watch`` replaces
#: the folder sources (`watched_sources`).
CONFIG_OVERRIDES: dict[str, tuple[str, ...]] = {
    "profile": ("profile",),
    "data_dir": ("data_dir",),
    "events_address": ("events.address",),
    "metrics_port": ("metrics.port",),
    "dashboard_port": ("dashboard.port",),
    "bind": ("metrics.host", "dashboard.host"),
    "backend": ("runtime.backend",),
}


def add_output_overrides(p: argparse.ArgumentParser) -> None:
    """The config keys of the live outputs, settable on the command line (`CONFIG_OVERRIDES`)."""
    g = p.add_argument_group("outputs (override the config)")
    g.add_argument("--events-address", metavar="ENDPOINT",
                   help="[events] address: ZeroMQ PUB endpoint (default: from the config, tcp://127.0.0.1:5557)")
    g.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="[metrics] port of the Prometheus /metrics page (default: from the config, 9108)")
    g.add_argument("--dashboard-port", type=int, metavar="PORT",
                   help="[dashboard] port of the live page; 0 = any free port (default: from the config, 8088)")


def add_run_overrides(p: argparse.ArgumentParser) -> None:
    """The options of ``run`` (and ``check-config``) that override the config (`CONFIG_OVERRIDES`, ``--watch``)."""
    p.add_argument("--watch", type=Path, action="append", metavar="DIR",
                   help="watch this folder (repeatable); replaces the config's folder sources, keeping the first "
                   "one's settings (polling, settle_s …); each is named after its folder, which prefixes its frame "
                   "ids (default: the config's sources, ./incoming)")
    p.add_argument("--profile", default=None,
                   help=f"profile = installed profile name or directory (default: from the config, {DEFAULT_PROFILE})")
    p.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                   help="data_dir = where state and archive go, relative to the current folder "
                   "(default: from the config, ./latticewatch-data)")
    add_output_overrides(p)
    p.add_argument("--bind", default=None, metavar="HOST",
                   help="[metrics] host and [dashboard] host: the address the HTTP outputs listen on; other machines "
                   "reach them only if it is not 127.0.0.1 (default: from the config, 127.0.0.1)")
    add_backend(p, default=None)


def watched_sources(config: Config, folders: list[Path]) -> dict[str, SourceConfig]:
    """``config``'s sources with its folder sources replaced by one per ``--watch`` folder.

    Each new source has the settings of the config's first folder source (or the defaults) and is
    named after its folder (letters, digits, ``-`` and ``_``; ``-2`` … when names repeat).

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> sources = watched_sources(parse_config({}, plugin_kinds=set()), [Path("/data/grid 1"), Path("/x/grid 1")])
    >>> {name: str(s.path) for name, s in sources.items()}
    {'grid-1': '/data/grid 1', 'grid-1-2': '/x/grid 1'}
    """
    from latticewatch.config import FolderSourceConfig

    folder_sources = [s for s in config.sources.values() if isinstance(s, FolderSourceConfig)]
    template = folder_sources[0] if folder_sources else FolderSourceConfig(kind="folder")
    sources = {name: s for name, s in config.sources.items() if not isinstance(s, FolderSourceConfig)}
    for folder in folders:
        path = Path(os.path.abspath(folder))  # relative to where the command runs, not to the config file
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", path.name).strip("-") or "watch"
        name, n = base, 1
        while name in sources:
            n += 1
            name = f"{base}-{n}"
        sources[name] = template.model_copy(update={"path": path})
    return sources


def with_overrides(config: Config, args: argparse.Namespace) -> Config:
    """``config`` with the keys given on the command line (`CONFIG_OVERRIDES`, ``--watch``), each validated.

    Raises
    ------
    ConfigError
        Naming the option and the config key when a value is not allowed there.

    Examples
    --------
    >>> from latticewatch.config import parse_config
    >>> args = argparse.Namespace(metrics_port=9200, dashboard_port=0)
    >>> config = with_overrides(parse_config({}, plugin_kinds=set()), args)
    >>> config.metrics.port, config.dashboard.port, config.profile
    (9200, 0, 'nanoparticles')
    """
    from pydantic import ValidationError

    top: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for dest, keys in CONFIG_OVERRIDES.items():
        value = getattr(args, dest, None)
        for key in keys if value is not None else ():
            table, _, name = key.rpartition(".")
            (tables.setdefault(table, {}) if table else top)[name] = value
    for table, values in tables.items():
        section = getattr(config, table)
        try:
            top[table] = type(section).model_validate({**dict(section), **values})  # values as they are: secrets
        except ValidationError as err:
            problem = err.errors()[0]
            key = f"{table}." + ".".join(map(str, problem["loc"]))
            raise ConfigError(f"{_option_of(key)}: {key}: {problem['msg'].removeprefix('Value error, ')}") from None
    if getattr(args, "watch", None):
        top["sources"] = watched_sources(config, args.watch)
    return config.model_copy(update=top)


def _option_of(key: str) -> str:
    """The command-line option that sets config ``key`` (`CONFIG_OVERRIDES`)."""
    return next("--" + dest.replace("_", "-") for dest, keys in CONFIG_OVERRIDES.items() if key in keys)


def _origin(args: argparse.Namespace) -> Callable[[str], str]:
    """Where each config key of this command was set: its option, the config file, or the defaults."""
    given = {key for dest, keys in CONFIG_OVERRIDES.items() if getattr(args, dest, None) is not None for key in keys}

    def where(key: str) -> str:
        if key in given:
            return _option_of(key)
        if args.watch and key.startswith("sources.") and key.endswith(".path"):
            return "--watch"
        return f"{args.config}: {key}" if args.config is not None else f"{key} (default)"

    return where


def load_run_config(args: argparse.Namespace) -> Config:
    """The config ``run`` would use: the file (or the defaults), the options over it, then `validate_config`.

    ``run`` and ``check-config`` share it (and ``run`` again on SIGHUP), so what one accepts the
    other does. Precedence: command line > config file > defaults.

    Raises
    ------
    ConfigError
        Every problem, one line each, naming the option, or the config file and key, or the default.

    Examples
    --------
    >>> args = build_parser().parse_args(["run", "--watch", "/data/grid1"])  # doctest: +SKIP
    >>> load_run_config(args).sources["grid1"].path  # doctest: +SKIP
    PosixPath('/data/grid1')
    """
    from latticewatch.config import load_config, validate_config

    if args.data_dir is not None:
        args.data_dir = Path(os.path.abspath(args.data_dir))  # relative to where the command runs
    return validate_config(with_overrides(load_config(args.config), args), where=_origin(args))
