"""Events: what the daemon tells the world about each frame, as pydantic models, and the `Sink` protocol.

Each analysed frame gives one `FrameEvent` and one `ParticleEvent` per region; input that cannot
be analysed gives one `ErrorEvent`; a frame outside the model's domain also gives a
`WarningEvent` of kind ``model_out_of_domain``; notices about the running process are `ErrorEvent`
(archive trouble) or `WarningEvent` (a source without pixel sizes); the publisher sends a
`StatusEvent` every few seconds. Event ids are deterministic, so a consumer can de-duplicate across restarts:

* ``<frame_id>/frame``
* ``<frame_id>/region/<region index>``
* ``<frame_id>/error``, ``<frame_id>/archive-error``, ``<frame_id>/pixel-size``, ``<frame_id>/out-of-domain``
* ``status/<run start>/<n>``

These models are the contract: the published JSON Schemas (``latticewatch/schemas/<type>.v1.json``)
are generated from them (`latticewatch.schemas.generate_schema`). An event is rendered once, to
one line of JSON (`Event.rendered`): that text is stored in the ledger, appended to the durable
log (`latticewatch.runtime.eventlog.EventLog`) and sent over ZeroMQ byte for byte. Sinks get the
typed objects once the log is durable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PrivateAttr,
    TypeAdapter,
)

from latticewatch.frame import CLASSES, UNCERTAIN, Analysis, Frame
from latticewatch.io.jsonio import json_default
from latticewatch.sinks.reports import frame_report
from latticewatch.stages.defect_fraction import DefectConfusion

#: The version of the event schemas (``latticewatch/schemas/<type>.v1.json``) the events follow.
SCHEMA_VERSION = 1
#: The particle label republished on the ``defect`` topic.
DEFECT_LABEL = "stacking_fault"

#: The ``kind`` of the warning that the model does not understand a frame.
OUT_OF_DOMAIN = "model_out_of_domain"

#: Float noise a computed fraction may carry past 0 or 1 (a convex hull's area a hair under the pixel count).
_ROUNDING = 1e-9


def _onto_unit_interval(value: Any) -> Any:
    """A fraction that float rounding put just outside [0, 1], put back on the bound (anything else: checked as is)."""
    if isinstance(value, float) and (-_ROUNDING < value < 0 or 1 < value < 1 + _ROUNDING):
        return min(max(value, 0.0), 1.0)
    return value


# the bounds first, then the snapping validator (it runs before them): the schema shows minimum and maximum
UnitInterval = Annotated[float, Field(ge=0, le=1), BeforeValidator(_onto_unit_interval)]
Time = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


def now() -> str:
    """The current UTC time as events write it (ISO 8601, milliseconds).

    Examples
    --------
    >>> now().endswith("+00:00")
    True
    """
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Event(BaseModel):
    """Fields every event has."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_serialization_defaults_required=True)

    event_id: str
    type: str
    at: Time = Field(description="UTC, ISO 8601, when the event was rendered")

    _rendered: str | None = PrivateAttr(default=None)

    def rendered(self) -> str:
        """The event as one line of JSON, without the newline: what is logged, stored and published.

        Rendered on first use and kept (events are frozen), so every consumer gets the same bytes.

        Examples
        --------
        >>> error_event("cam:7", "pull tcp://127.0.0.1:5555", "header is not JSON").rendered()[:45]
        '{"event_id":"cam:7/error","type":"error","at"'
        """
        if self._rendered is None:
            self._rendered = json.dumps(self.model_dump(), default=json_default, separators=(",", ":"))
        return self._rendered

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Event:
        """A copy (see `pydantic.BaseModel.model_copy`) that renders itself again."""
        copy = super().model_copy(update=update, deep=deep)
        copy._rendered = None
        return copy


class RunnerInfo(BaseModel):
    """What the runner measured around the stage calls of one frame."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phases_s: dict[str, NonNegativeFloat]
    latency_s: NonNegativeFloat = Field(description="arrival (read from disk or socket) to analysis published")
    budget_ms: float | None
    overrun: bool


class FrameEvent(Event):
    """One per analysed frame; event_id = <frame_id>/frame."""

    type: Literal["frame"] = "frame"
    event_id: str = Field(pattern="/frame$")
    frame_id: str = Field(min_length=1)
    name: str
    shape: list[Annotated[int, Field(ge=1)]] = Field(min_length=2, max_length=2)
    pixel_size_nm: float | None = Field(gt=0)
    particles: NonNegativeInt
    coverage: UnitInterval
    content_ratio: UnitInterval = Field(description="1 − coverage: the fraction of pixels not in the foreground class "
                                                "(clean graphene for the graphene profile)")
    class_counts: dict[str, NonNegativeInt]
    defect_fraction: UnitInterval | None = Field(
        description="stacking faults among the particles labelled stacking_fault or no_stacking_fault, corrected for "
                    "the classifier's measured confusion (defect_confusion); null: none counted or out of domain")
    # defaults: events logged before these fields existed still parse
    defect_fraction_raw: UnitInterval | None = Field(None, description="the plain ratio of the counts, uncorrected")
    defect_fraction_lower: UnitInterval | None = Field(None, description="lower bound of the 95 % interval")
    defect_fraction_upper: UnitInterval | None = Field(None, description="upper bound of the 95 % interval")
    out_of_domain: list[str] = Field(
        default_factory=list,
        description=f"why the model's answer is not to be trusted (empty: in its domain); a {OUT_OF_DOMAIN} warning "
                    "event says the same, and the frame's particles are left out of the statistics")
    mean_confidence: float
    seconds: NonNegativeFloat
    origin: str
    acquired_at: str | None
    dtype: str
    meta: dict[str, Any]
    profile: str
    model_ids: dict[str, str]
    defect_confusion: DefectConfusion | None = Field(
        None, description="the classifier's held-out confusion that corrects the defect fraction (null: none); "
                          "with class_counts, what a consumer needs to pool frames")
    timings_s: dict[str, NonNegativeFloat]
    warnings: list[str]
    runner: RunnerInfo

    _analysed: tuple[Frame, Analysis] | None = PrivateAttr(default=None)

    @property
    def analysed(self) -> tuple[Frame, Analysis] | None:
        """The frame and analysis the event was made from (pixels, mask); ``None`` when read back from the ledger.

        The dashboard draws its thumbnail from them; nothing of them is rendered.
        """
        return self._analysed


class ParticleEvent(Event):
    """One per region; event_id = <frame_id>/region/<region_id>. Pixel coordinates of the original frame; *_nm null
    when the pixel size is unknown."""

    type: Literal["particle"] = "particle"
    event_id: str = Field(pattern="/region/[0-9]+$")
    frame_id: str = Field(min_length=1)
    region_id: NonNegativeInt
    bbox: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt] = Field(
        description="row0, col0, row1, col1 (end exclusive)")
    centroid_px: tuple[float, float]
    centroid_nm: tuple[float, float] | None
    area_px: int = Field(ge=1)
    area_nm2: NonNegativeFloat | None
    equivalent_diameter_nm: NonNegativeFloat | None
    eccentricity: UnitInterval
    solidity: UnitInterval
    touches_edge: bool
    agglomerate_suspect: bool
    features: dict[str, float]
    # any class of the profile's classifier: a profile may name its own, so they are not enumerated
    label: str = Field(description=f"the profile's class: {', '.join(CLASSES)} for the shipped profiles, "
                                   f"{UNCERTAIN} (no class probable enough), or unclassified (no classifier)")
    probabilities: dict[str, UnitInterval]

    @property
    def is_defect(self) -> bool:
        """A stacking-fault particle: published again on the ``defect`` topic."""
        return self.label == DEFECT_LABEL


def _absent_when_none(value: Any) -> bool:
    return value is None


class ErrorEvent(Event):
    """Input that cannot be analysed (<frame_id>/error: quarantined) or archive trouble (<frame_id>/archive-error,
    component = archive)."""

    type: Literal["error"] = "error"
    event_id: str = Field(pattern="/[a-z-]*error$")
    frame_id: str
    origin: str
    problem: str = Field(min_length=1, description="what failed and what was done with it")
    component: str | None = Field(None, exclude_if=_absent_when_none)
    reason: str | None = Field(None, exclude_if=_absent_when_none)
    retry_in_s: float | None = Field(None, exclude_if=_absent_when_none)


class WarningEvent(Event):
    """A notice: a source's frames carry no pixel size (<first frame id>/pixel-size, kind pixel_size_unknown), or the
    model does not understand a frame (<frame_id>/out-of-domain, kind model_out_of_domain, with its reasons)."""

    type: Literal["warning"] = "warning"
    event_id: str = Field(min_length=1)
    frame_id: str
    origin: str
    problem: str = Field(min_length=1)
    source: str
    kind: str | None = Field(None, exclude_if=_absent_when_none,
                             description=f"pixel_size_unknown or {OUT_OF_DOMAIN}")
    reasons: list[str] | None = Field(None, exclude_if=_absent_when_none,
                                      description=f"{OUT_OF_DOMAIN}: each test the frame failed")


class PublisherCounters(BaseModel):
    """The ZeroMQ publisher's counters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sent: NonNegativeInt
    dropped: NonNegativeInt = Field(description="messages dropped at a subscriber's high-water mark")
    status: NonNegativeInt


class StatusEvent(Event):
    """Periodic (events.status_interval_s) snapshot of the running daemon; not in the durable log. event_id =
    status/<run start>/<n>."""

    # the defaults are a daemon that has no pipeline yet (nothing analysed, nothing waiting)
    type: Literal["status"] = "status"
    event_id: str = Field(pattern="^status/")
    schema_version: Literal[1] = SCHEMA_VERSION
    fps: NonNegativeFloat = Field(0.0, description="frames analysed per second since the last status event")
    analysed: NonNegativeInt = 0
    quarantined: NonNegativeInt = 0
    overruns: NonNegativeInt = 0
    deferred: NonNegativeInt = 0
    budget_ms: float | None = None
    backlog: dict[str, NonNegativeInt] = Field(
        default_factory=dict,
        description="frames waiting: prepare, segment, finish, deferred, archive, archive_backlog")
    publisher: PublisherCounters


#: The events of the durable log, told apart by ``type``.
LoggedEvent = Annotated[Union[FrameEvent, ParticleEvent, ErrorEvent, WarningEvent], Field(discriminator="type")]
_LOGGED = TypeAdapter(LoggedEvent)


def frame_events(frame: Frame, analysis: Analysis,
                 runner: RunnerInfo) -> list[FrameEvent | ParticleEvent | WarningEvent]:
    """The ``frame`` event, one ``particle`` event per region and, for a frame outside the model's domain, its
    ``model_out_of_domain`` warning (the frame event carries ``frame`` and ``analysis``).

    Raises `pydantic.ValidationError` when the analysis breaks the published schema.

    Examples
    --------
    >>> runner = RunnerInfo(phases_s={"segment": 0.1}, latency_s=0.2, budget_ms=None, overrun=False)
    >>> events = frame_events(frame, analysis, runner)  # doctest: +SKIP
    >>> [e.event_id for e in events][:2]  # doctest: +SKIP
    ['incoming:stack.mrc#0/frame', 'incoming:stack.mrc#0/region/0']
    """
    report = frame_report(frame, analysis)
    regions = report.pop("regions")
    report["acquired_at"] = frame.acquired_at.isoformat() if frame.acquired_at is not None else None
    at = now()
    head = FrameEvent(event_id=f"{frame.frame_id}/frame", at=at, **report, runner=runner)
    head._analysed = (frame, analysis)
    particles = [ParticleEvent(event_id=f"{frame.frame_id}/region/{r['region_id']}", at=at, frame_id=frame.frame_id,
                               **r) for r in regions]
    doubts = [out_of_domain_warning(frame, analysis.out_of_domain)] if analysis.out_of_domain else []
    return [head, *particles, *doubts]


def error_event(frame_id: str, origin: str, problem: str) -> ErrorEvent:
    """The ``error`` event of input that cannot be analysed (the frame is quarantined).

    Examples
    --------
    >>> error_event("cam:malformed:ab12", "pull tcp://127.0.0.1:5555", "header is not JSON").event_id
    'cam:malformed:ab12/error'
    """
    return ErrorEvent(event_id=f"{frame_id}/error", at=now(), frame_id=frame_id, origin=origin, problem=problem)


def archive_error_event(frame_id: str, origin: str, problem: str, *, reason: str, retry_in_s: float) -> ErrorEvent:
    """The ``error`` event of the archive becoming unavailable while writing a frame.

    Examples
    --------
    >>> archive_error_event("cam:s#3", "", "disk full", reason="no_space", retry_in_s=5.0).event_id
    'cam:s#3/archive-error'
    """
    return ErrorEvent(event_id=f"{frame_id}/archive-error", at=now(), frame_id=frame_id, origin=origin, problem=problem,
                      component="archive", reason=reason, retry_in_s=retry_in_s)


def pixel_size_warning(frame_id: str, origin: str, problem: str, *, source: str) -> WarningEvent:
    """The ``warning`` that a source's frames carry no pixel size (said once per source, on its first frame).

    Examples
    --------
    >>> pixel_size_warning("cam:0", "", "no pixel size", source="cam").event_id
    'cam:0/pixel-size'
    """
    return WarningEvent(event_id=f"{frame_id}/pixel-size", at=now(), frame_id=frame_id, origin=origin, problem=problem,
                        source=source, kind="pixel_size_unknown")


def out_of_domain_warning(frame: Frame, reasons: Sequence[str]) -> WarningEvent:
    """The ``model_out_of_domain`` warning of a frame the model does not understand.

    Examples
    --------
    >>> import numpy as np
    >>> event = out_of_domain_warning(Frame("cam:s#3", np.zeros((16, 16))), ["probability near 0.5"])
    >>> event.event_id, event.kind, event.source
    ('cam:s#3/out-of-domain', 'model_out_of_domain', 'cam')
    """
    problem = (f"{frame.frame_id}: model out of domain ({'; '.join(reasons)}); its particles are left out of the "
               "statistics and the frame is archived lossless")
    return WarningEvent(event_id=f"{frame.frame_id}/out-of-domain", at=now(), frame_id=frame.frame_id,
                        origin=frame.origin, problem=problem, source=frame.frame_id.partition(":")[0],
                        kind=OUT_OF_DOMAIN, reasons=list(reasons))


def render(events: Sequence[Event]) -> str:
    """Events as JSON lines: the exact text stored in the ledger and appended to the log.

    Examples
    --------
    >>> render([error_event("a", "", "x"), error_event("b", "", "y")]).count("\\n")
    2
    """
    return "".join(event.rendered() + "\n" for event in events)


def parse(text: str) -> list[Event]:
    """The events of JSON lines written by `render` (the ledger's stored text), each keeping its exact line.

    Raises `pydantic.ValidationError` (a `ValueError`) for a line that is not an event of the log.

    Examples
    --------
    >>> text = render([error_event("a", "", "x")])
    >>> [event] = parse(text)
    >>> event.problem, render([event]) == text
    ('x', True)
    """
    events = []
    for line in text.splitlines():
        if line:
            event = _LOGGED.validate_python(json.loads(line))
            event._rendered = line
            events.append(event)
    return events


def topics(event: Event) -> tuple[str, ...]:
    """The topics (without the ``latticewatch.`` prefix) an event is published on.

    Examples
    --------
    >>> topics(error_event("a", "", "x"))
    ('error',)
    """
    return (event.type, "defect") if isinstance(event, ParticleEvent) and event.is_defect else (event.type,)


class Sink(Protocol):
    """Consumes the events of the durable log: ZeroMQ publisher, metrics, dashboard.

    ``consume`` gets the events of one append to the log (a frame's events, or notices), in log
    order, once they are durable. It must not block: a slow consumer drops or queues on its own
    side. An exception is logged and counted by the log's owner; it never stops the pipeline.
    """

    name: str

    def consume(self, events: Sequence[Event]) -> None: ...
