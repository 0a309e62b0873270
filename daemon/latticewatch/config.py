"""The daemon's TOML configuration, validated by pydantic.

Every error names the key (``sources.cam.socket``) and says what is allowed. Relative paths are
taken relative to the config file's folder (to the working directory when there is no file).

Example (every key with its default)::

    profile = "nanoparticles"          # installed profile name, or a profile directory
    data_dir = "./latticewatch-data"   # state (ledger, events, spool, quarantine) goes in <data_dir>/state
    calibration = "calibration/scope.toml"  # optional: magnification → pixel size for frames without one

    [runtime]
    runner = "pipelined"               # or "inline" (one thread; sources one after another)
    budget_ms = 2000                   # per-frame processing budget; overruns are counted
    queue_size = 4                     # frames between pipeline phases
    max_batch = 4                      # frames segmented together when behind
    threads = 0                        # inference threads; 0 = all cores
    backend = "auto"                   # tensorrt, cuda, openvino or onnxruntime; auto: the fastest that runs here
    # scheduler = "tcp://gpu-server:8786"  # default none; a Dask cluster that analyses frames when behind
    # offload_after_ms = 1000          # a frame that waited longer goes to it; default budget_ms / 2

    [archive]
    enabled = true
    root = "./latticewatch-data/archive"  # default: <data_dir>/archive
    policy = "drop"                    # low-value pixels: drop[:FILL], mean or quantize:N
    margin_nm = 0.5                    # kept exactly around the high-value class
    reduce = true                      # false: every frame whole and lossless
    codec = "auto"                     # lossless compression of the stored arrays
    max_bytes = 2147483648             # rotate pending segments into a volume past this size ...
    max_age_s = 3600                   # ... or age
    min_free_bytes = 67108864          # stop archiving before the disk is full
    retry_max_s = 60                   # longest wait between attempts while the archive is unavailable

    [events]                           # ZeroMQ PUB of the events (always in <state>/events.jsonl too)
    enabled = true
    address = "tcp://127.0.0.1:5557"   # bound; multipart [topic, JSON]
    high_water_mark = 1000             # per subscriber; beyond it events are dropped and counted
    status_interval_s = 5.0            # latticewatch.status every this many seconds; 0 = none
    # curve_secret_key = "keys/daemon.key_secret"  # default none; with curve_clients: CURVE, allowed peers only
    # curve_clients = "keys/subscribers"           # directory of the allowed subscribers' public keys (*.key)

    [events.log]                       # rotation and retention of <state>/events.jsonl
    max_bytes = 67108864               # rotate to events.jsonl.000001, .000002 … past this size ...
    max_age_s = 0                      # ... or once its first event is this old; 0 = by size only
    keep = 20                          # rotated files kept; 0 = no limit ...
    keep_days = 0                      # ... and none last written longer ago than this; 0 = no limit
    compress = "gzip"                  # rotated files: "gzip" (.gz) or "none"

    [metrics]                          # Prometheus /metrics
    enabled = true
    host = "127.0.0.1"
    port = 9108
    rolling_frames = 100               # frames in latticewatch_defect_fraction_rolling

    [dashboard]                        # live page + verdict API, http://127.0.0.1:8088/
    enabled = true
    host = "127.0.0.1"
    port = 8088                        # 0: any free port (logged)
    history = 1000                     # frames kept for the time series
    thumbnail_px = 384
    sse_queue = 16                     # page updates a browser may lag before it is dropped
    max_rate_hz = 4.0                  # page updates per second at most
    verdict_min_particles = 1          # verdict "skip" when fewer particles ...
    verdict_min_coverage = 0.0         # ... or less particle coverage (0–1) than this
    verdict_file = "latticewatch_verdict.json"  # optional; default none. A name: next to each frame's file

    [sources.incoming]                 # one table per source; the table name names the source
    kind = "folder"
    path = "./incoming"
    polling = false                    # true for SMB/NFS shares (inotify misses remote writes)
    settle_s = 1.0
    poll_interval_s = 1.0
    recursive = true
    permissive = false

    [sources.camera]
    kind = "zmq"
    address = "tcp://127.0.0.1:5555"
    socket = "pull"                    # or "sub"
    bind = false
    max_pixels = 268435456
    high_water_mark = 1000             # messages ZeroMQ buffers here (lost at a SIGKILL, and counted as gaps)
    # curve_secret_key = "keys/daemon.key_secret"  # default none; with curve_clients: CURVE, allowed peers only
    # curve_clients = "keys/cameras"               # directory of the allowed senders' public keys (*.key)

Other ``kind`` values name source plugins (entry point group ``latticewatch.sources``); their
tables go to the plugin's factory unchanged.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latticewatch.errors import ConfigError, LatticewatchError
from latticewatch.io.readers import DEFAULT_MAX_PIXELS


def _zmq_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ endpoint such as tcp://127.0.0.1:5555 (tcp://, ipc:// or inproc://)")
    return value


ZmqEndpoint = Annotated[str, AfterValidator(_zmq_endpoint)]

log = logging.getLogger(__name__)

#: Hosts that only this machine can reach: the only ones a default config ever binds.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://HOST:PORT`` endpoint (``*`` = every interface); ``None`` for ipc:// and inproc://.

    Examples
    --------
    >>> endpoint_host("tcp://127.0.0.1:5557"), endpoint_host("tcp://*:5557"), endpoint_host("ipc:///run/lw")
    ('127.0.0.1', '*', None)
    """
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint.removeprefix("tcp://").rpartition(":")[0]


def _warn_if_exposed(key: str, host: str | None) -> None:
    """A listener that other machines can reach is allowed, but never silently (the defaults bind loopback only)."""
    if host is not None and host not in LOOPBACK_HOSTS and host != "::1":
        log.warning("%s binds %r: reachable from other machines", key, host)


def _listen_host(value: str, key: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError("must be a host name or address such as 127.0.0.1 (0.0.0.0 exposes it to the network)")
    _warn_if_exposed(key, value)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FolderSourceConfig(_Strict):
    kind: Literal["folder"]
    path: Path = Path("./incoming")
    polling: bool = False
    settle_s: float = Field(1.0, ge=0, le=3600)
    poll_interval_s: float = Field(1.0, gt=0, le=3600)
    recursive: bool = True
    permissive: bool = False


def _both_curve_keys(model: Any) -> Any:
    """ZeroMQ CURVE (`latticewatch.io.curve`) needs both keys; neither means no authentication."""
    if (model.curve_secret_key is None) != (model.curve_clients is None):
        raise ValueError("curve_secret_key and curve_clients go together: give both or neither")
    return model


def _curve_resolved(model: Any, base: Path) -> Any:
    if model.curve_secret_key is None:
        return model
    return model.model_copy(update={"curve_secret_key": base / model.curve_secret_key,
                                    "curve_clients": base / model.curve_clients})


class ZmqSourceConfig(_Strict):
    kind: Literal["zmq"]
    address: ZmqEndpoint = "tcp://127.0.0.1:5555"
    socket: Literal["pull", "sub"] = "pull"
    bind: bool = False
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    high_water_mark: int = Field(1000, ge=1)
    curve_secret_key: Path | None = None  # the daemon's secret key file (zmq.auth.create_certificates)
    curve_clients: Path | None = None  # directory of the allowed senders' public keys (*.key)

    _curve = model_validator(mode="after")(_both_curve_keys)

    @model_validator(mode="after")
    def _exposed(self) -> ZmqSourceConfig:
        if self.bind:
            _warn_if_exposed("sources.*.address", endpoint_host(self.address))
        return self


class PluginSourceConfig(BaseModel):
    """A source provided by a plugin: ``kind`` plus whatever the plugin's factory accepts."""

    model_config = ConfigDict(frozen=True)
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)


SourceConfig = FolderSourceConfig | ZmqSourceConfig | PluginSourceConfig
BUILTIN_KINDS = {"folder": FolderSourceConfig, "zmq": ZmqSourceConfig}


class RuntimeConfig(_Strict):
    runner: Literal["pipelined", "inline"] = "pipelined"
    budget_ms: float = Field(2000.0, gt=0)
    queue_size: int = Field(4, ge=1, le=1024)
    max_batch: int = Field(4, ge=1, le=256)
    threads: int = Field(0, ge=0)
    backend: Literal["auto", "tensorrt", "cuda", "openvino", "onnxruntime"] = "auto"  # models.backends.BACKEND_CHOICES
    scheduler: str | None = None  # a Dask scheduler (`latticewatch.runtime.offload`); None: everything here
    offload_after_ms: float | None = Field(None, gt=0)  # None: budget_ms / 2

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        host, _, port = rest.rpartition(":")
        if (scheme == "inproc" and rest) or (scheme in ("tcp", "tls") and host and port.isdigit()):
            return value
        raise ValueError("must be a Dask scheduler address such as tcp://gpu-server:8786 (tcp://HOST:PORT, "
                         "tls://HOST:PORT or inproc://…), or left out to analyse every frame here")

    @model_validator(mode="after")
    def _offload_needs_scheduler(self) -> RuntimeConfig:
        if self.offload_after_ms is not None and self.scheduler is None:
            raise ValueError("offload_after_ms sends frames to a Dask cluster: set scheduler too, or leave it out")
        return self


class ArchiveConfig(_Strict):
    """``[archive]``; which class is low-value and when a frame is uncertain come from the profile."""

    enabled: bool = True
    root: Path | None = None  # None: <data_dir>/archive
    policy: str = "drop"
    margin_nm: float = Field(0.5, ge=0, le=1000)
    reduce: bool = True
    codec: str = "auto"
    max_bytes: int = Field(2 * 2**30, gt=0)
    max_age_s: float = Field(3600.0, gt=0)
    min_free_bytes: int = Field(64 * 2**20, ge=0)
    retry_max_s: float = Field(60.0, gt=0, le=3600)

    @field_validator("policy")
    @classmethod
    def _policy(cls, value: str) -> str:
        from latticewatch.sinks.archive.reduce import Policy

        return str(Policy.parse(value))  # its ValueError says what is allowed

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        from latticewatch.sinks.archive import Codec

        return str(Codec.parse(value))


class EventLogConfig(_Strict):
    """``[events.log]``: rotation and retention of ``<state>/events.jsonl`` (`latticewatch.runtime.eventlog`)."""

    max_bytes: int = Field(64 * 2**20, gt=0)  # rotate past this size ...
    max_age_s: float = Field(0.0, ge=0)  # ... or once its first event is this old; 0: by size only
    keep: int = Field(20, ge=0)  # rotated files kept; 0: no limit
    keep_days: float = Field(0.0, ge=0)  # rotated files last written longer ago are removed; 0: no limit
    compress: Literal["gzip", "none"] = "gzip"  # rotated files


class EventsConfig(_Strict):
    """``[events]``: the ZeroMQ PUB of the events (they always go to the durable log too)."""

    enabled: bool = True
    address: ZmqEndpoint = "tcp://127.0.0.1:5557"
    high_water_mark: int = Field(1000, ge=1)
    status_interval_s: float = Field(5.0, ge=0, le=3600)
    log: EventLogConfig = EventLogConfig()
    curve_secret_key: Path | None = None  # the daemon's secret key file (zmq.auth.create_certificates)
    curve_clients: Path | None = None  # directory of the allowed subscribers' public keys (*.key)

    _curve = model_validator(mode="after")(_both_curve_keys)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        _warn_if_exposed("events.address", endpoint_host(value))
        return value


class MetricsConfig(_Strict):
    """``[metrics]``: Prometheus ``/metrics`` over HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    rolling_frames: int = Field(100, ge=1, le=1_000_000)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _listen_host(value, "metrics.host")


class DashboardConfig(_Strict):
    """``[dashboard]``: the live page and the verdict API (``GET /api/verdict/latest``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=0, le=65535)  # 0: any free port (logged)
    history: int = Field(1000, ge=10, le=100_000)  # frames kept for the time series
    thumbnail_px: int = Field(384, ge=64, le=2048)
    sse_queue: int = Field(16, ge=1, le=1024)  # messages a browser may lag before it is dropped
    max_rate_hz: float = Field(4.0, gt=0, le=50)  # page updates per second at most
    verdict_min_particles: int = Field(1, ge=0)  # skip when fewer particles ...
    verdict_min_coverage: float = Field(0.0, ge=0, le=1)  # ... or less coverage than this
    verdict_file: str | None = None  # e.g. "latticewatch_verdict.json": written next to each frame's file

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _listen_host(value, "dashboard.host")

    @field_validator("verdict_file")
    @classmethod
    def _verdict_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if not value or value.endswith(("/", "\\")) or (not path.is_absolute() and len(path.parts) != 1):
            raise ValueError("must be a file name (written next to each frame's file) or an absolute path")
        micrograph = (".mrc", ".st", ".tif", ".tiff", ".mdoc", ".dm4", ".dm3", ".emd", ".ser", ".png")
        if path.name.startswith(".") or path.suffix.lower() in micrograph:
            raise ValueError("must not be a dotfile or a micrograph suffix (the folder source would pick it up); "
                             "use e.g. latticewatch_verdict.json")
        return value


class Config(_Strict):
    """The whole configuration; `load_config` builds it from a file."""

    profile: str = "nanoparticles"
    data_dir: Path = Path("./latticewatch-data")
    calibration: Path | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    archive: ArchiveConfig = ArchiveConfig()
    events: EventsConfig = EventsConfig()
    metrics: MetricsConfig = MetricsConfig()
    dashboard: DashboardConfig = DashboardConfig()
    sources: dict[str, SourceConfig] = Field(default_factory=lambda: {"incoming": FolderSourceConfig(kind="folder")})

    @property
    def state_dir(self) -> Path:
        return self.data_dir / "state"

    @property
    def archive_root(self) -> Path:
        return self.archive.root if self.archive.root is not None else self.data_dir / "archive"


def _source(name: str, table: Any, plugin_kinds: set[str]) -> tuple[SourceConfig | None, list[str]]:
    where = f"sources.{name}"
    if not isinstance(table, dict):
        return None, [f"{where}: must be a table ([{where}]) with a 'kind' key"]
    if not name.replace("-", "").replace("_", "").isalnum():
        return None, [f"{where}: source names may use letters, digits, '-' and '_' only (they prefix frame ids)"]
    kind = table.get("kind")
    allowed = ", ".join(sorted({*BUILTIN_KINDS, *plugin_kinds}))
    if kind in BUILTIN_KINDS:
        try:
            return BUILTIN_KINDS[kind].model_validate(table), []
        except ValidationError as err:
            return None, _describe(err, prefix=where, model=BUILTIN_KINDS[kind])
    if kind in plugin_kinds:
        return PluginSourceConfig(kind=kind, options={k: v for k, v in table.items() if k != "kind"}), []
    if kind is None:
        return None, [f"{where}.kind: missing; allowed: {allowed}"]
    return None, [f"{where}.kind: unknown source kind {kind!r}; allowed: {allowed} (plugins add more)"]


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model that holds the key at ``loc`` (for listing the keys allowed next to a typo)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return model


def _describe(err: ValidationError, *, model: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(model, e["loc"][:-1]).model_fields)
            lines.append(f"{key}: unknown key; allowed here: {allowed}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            shown = "input" in e and not isinstance(e["input"], dict)
            lines.append(f"{key}: {msg} (got {e['input']!r})" if shown else f"{key}: {msg}")
    return lines


def parse_config(data: dict[str, Any], *, base: Path | None = None, plugin_kinds: set[str] | None = None) -> Config:
    """Validate a config mapping (as read from TOML); raise `ConfigError` listing every problem.

    Examples
    --------
    >>> parse_config({"sources": {"cam": {"kind": "zmq", "socket": "push"}}}, plugin_kinds=set())
    Traceback (most recent call last):
    ...
    latticewatch.errors.ConfigError: sources.cam.socket: Input should be 'pull' or 'sub' (got 'push')
    >>> parse_config({}, plugin_kinds=set()).sources["incoming"].path
    PosixPath('incoming')
    """
    if plugin_kinds is None:
        from latticewatch.sources.base import discover_sources

        plugin_kinds = set(discover_sources())
    problems: list[str] = []
    top = dict(data)
    raw_sources = top.pop("sources", None)
    sources: dict[str, SourceConfig] = {}
    if raw_sources is not None:
        if not isinstance(raw_sources, dict) or not raw_sources:
            problems.append("sources: must hold at least one [sources.<name>] table")
        else:
            for name, table in raw_sources.items():
                parsed, errors = _source(name, table, plugin_kinds)
                problems += errors
                if parsed is not None:
                    sources[name] = parsed
    try:
        config = Config.model_validate(top)
    except ValidationError as err:
        problems += _describe(err, model=Config)
        config = None
    if problems:
        raise ConfigError("\n".join(problems))
    if sources:
        config = config.model_copy(update={"sources": sources})
    config = _resolve_paths(config, base) if base is not None else config
    if config.calibration is not None:
        from latticewatch.calibration import CalibrationError, load_calibration

        try:
            load_calibration(config.calibration)
        except CalibrationError as err:
            raise ConfigError(f"calibration: {err}") from None
    return config


def _resolve_paths(config: Config, base: Path) -> Config:
    sources = {
        name: s.model_copy(update={"path": base / s.path}) if isinstance(s, FolderSourceConfig)
        else _curve_resolved(s, base) if isinstance(s, ZmqSourceConfig) else s
        for name, s in config.sources.items()
    }
    profile = config.profile
    if ("/" in profile or profile.startswith(".")) and not Path(profile).is_absolute():
        profile = str(base / profile)
    update: dict[str, Any] = {"data_dir": base / config.data_dir, "sources": sources, "profile": profile,
                              "events": _curve_resolved(config.events, base)}
    if config.calibration is not None:
        update["calibration"] = base / config.calibration
    if config.archive.root is not None:
        update["archive"] = config.archive.model_copy(update={"root": base / config.archive.root})
    return config.model_copy(update=update)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML config file; ``None`` gives the defaults.

    Examples
    --------
    >>> load_config(None).runtime.runner
    'pipelined'
    """
    if path is None:
        return parse_config({})
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    try:
        return parse_config(data, base=path.resolve().parent)
    except ConfigError as err:
        raise ConfigError("\n".join(f"{path}: {line}" for line in str(err).splitlines())) from None


def _folder_problem(path: Path) -> str | None:
    """Why a watched folder cannot be watched, naming its absolute path; ``None`` when it can."""
    absolute = Path(os.path.abspath(path))
    if not absolute.exists():
        return f"{absolute}: no such folder (watched folders are never created: create it, or fix the path)"
    if not absolute.is_dir():
        return f"{absolute}: not a folder"
    if not os.access(absolute, os.R_OK | os.X_OK):
        return f"{absolute}: cannot be read (permission denied)"
    return None


def validate_config(config: Config, *, where: Callable[[str], str] = str) -> Config:
    """Check what a run needs beyond the schema; raise `ConfigError` with one line per problem.

    The profile must resolve (an installed name or a profile directory) with every model file
    matching its manifest's sha256, ``[runtime] backend`` must be able to run here, every folder
    source's folder must exist (the daemon never creates one: a typo must not become an empty folder
    watched for weeks), and every plugin source kind must load. ``latticewatch run`` and
    ``check-config`` both call this, before anything starts; ``where(key)`` says where a key was set
    (``"lw.toml: profile"``, ``"--watch"``).

    Examples
    --------
    >>> config = parse_config({"sources": {"cam": {"kind": "folder", "path": "/no/such"}}}, plugin_kinds=set())
    >>> validate_config(config, where=lambda key: f"lw.toml: {key}")
    Traceback (most recent call last):
    ...
    latticewatch.errors.ConfigError: lw.toml: sources.cam.path: /no/such: no such folder (watched folders are ...
    """
    from latticewatch.models.backends import unavailable
    from latticewatch.runtime.plugins import resolve_profile
    from latticewatch.sources.base import discover_sources

    problems: list[str] = []
    try:
        resolve_profile(config.profile)
    except (LatticewatchError, OSError) as err:
        problems.append(f"{where('profile')}: {err}")
    backend_problem = unavailable(config.runtime.backend)
    if backend_problem:
        problems.append(f"{where('runtime.backend')}: {config.runtime.backend} cannot run here: {backend_problem}")
    plugins = None
    for name, source in config.sources.items():
        if isinstance(source, FolderSourceConfig):
            problem = _folder_problem(source.path)
            if problem:
                problems.append(f"{where(f'sources.{name}.path')}: {problem}")
        elif isinstance(source, PluginSourceConfig):
            plugins = plugins if plugins is not None else discover_sources()
            plugin = plugins.get(source.kind)
            if plugin is None or plugin.factory is None:
                why = plugin.error if plugin else "not installed"
                problems.append(f"{where(f'sources.{name}.kind')}: source plugin {source.kind!r} is unusable: {why}")
    if problems:
        raise ConfigError("\n".join(problems))
    return config
