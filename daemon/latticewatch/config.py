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
    high_water_mark = 1000

Other ``kind`` values name source plugins (entry point group ``latticewatch.sources``); their
tables go to the plugin's factory unchanged.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from latticewatch.errors import ConfigError
from latticewatch.io.readers import DEFAULT_MAX_PIXELS


def _zmq_endpoint(value: str) -> str:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("must be a ZeroMQ endpoint such as tcp://127.0.0.1:5555 (tcp://, ipc:// or inproc://)")
    return value


ZmqEndpoint = Annotated[str, AfterValidator(_zmq_endpoint)]

log = logging.getLogger(__name__)

#: Hosts that only this machine can reach: the only ones a default config ever binds.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


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


class ZmqSourceConfig(_Strict):
    kind: Literal["zmq"]
    address: ZmqEndpoint = "tcp://127.0.0.1:5555"
    socket: Literal["pull", "sub"] = "pull"
    bind: bool = False
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    high_water_mark: int = Field(1000, ge=1)


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


class EventsConfig(_Strict):
    """``[events]``: the ZeroMQ PUB of the events (they always go to the durable log too)."""

    enabled: bool = True
    address: ZmqEndpoint = "tcp://127.0.0.1:5557"
    high_water_mark: int = Field(1000, ge=1)
    status_interval_s: float = Field(5.0, ge=0, le=3600)


class MetricsConfig(_Strict):
    """``[metrics]``: Prometheus ``/metrics`` over HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)
    rolling_frames: int = Field(100, ge=1, le=1_000_000)


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
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a host name or address such as 127.0.0.1 (0.0.0.0 exposes it to the network)")
        if value.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            log.warning("dashboard.host = %r: the dashboard is reachable from other machines", value)
        return value

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
        name: s.model_copy(update={"path": base / s.path}) if isinstance(s, FolderSourceConfig) else s
        for name, s in config.sources.items()
    }
    profile = config.profile
    if ("/" in profile or profile.startswith(".")) and not Path(profile).is_absolute():
        profile = str(base / profile)
    update: dict[str, Any] = {"data_dir": base / config.data_dir, "sources": sources, "profile": profile}
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
