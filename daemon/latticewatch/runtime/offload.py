"""Offload: the daemon sends frames to a Dask cluster when it falls behind its budget.

``[runtime] scheduler = "tcp://gpu-server:8786"`` names the cluster. The rule is asked at one
point, when the prepare phase takes a frame: a frame that has waited longer than
``offload_after_ms`` (default half of ``budget_ms``) since it arrived goes, pixels and all, to
the cluster (`latticewatch.runtime.cluster.analyse_pixels` on a worker, which loads the profile
once) instead of through the local phases. Waiting is what falling behind looks like from the
inside: the queues in front of the phases fill, and each frame waits longer for its turn.

An offloaded frame keeps its place in the pipeline: it passes the segment phase untouched, and
the finish phase, which takes frames in arrival order, waits for the cluster's analysis of it and
then records it exactly as a local one — ledger, event log, sinks, archive, all on this machine.
So events keep the order in which each source's frames arrived, and the ledger never leaves the
instrument PC. The frame event shows where it was analysed: its ``runner.phases_s`` has
``remote`` (seconds from sending the pixels to having the analysis back) instead of ``prepare``,
``segment`` and ``finish``; the metrics count offloaded frames as
``latticewatch_phase_seconds_count{phase="remote"}``.

Failures cost time, never frames:

* a scheduler that cannot be reached at start: a warning, every frame is analysed here, and
  the connection is tried again every `RETRY_S`;
* a cluster lost mid-run (its futures cancelled, a timeout, workers gone): the frames in flight
  are analysed here in their turn, and nothing is sent for `RETRY_S`;
* a worker's analysis of a different profile (its model ids differ from this one's): refused,
  said once, and nothing more is sent to that cluster in this run;
* a frame the worker refuses (`latticewatch.errors.LatticewatchError`): analysed here, where it
  is quarantined with the same reason as any local frame.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latticewatch.errors import LatticewatchError
from latticewatch.frame import Analysis, Frame

log = logging.getLogger(__name__)

#: Seconds to reach the scheduler when connecting.
CONNECT_TIMEOUT_S = 5.0
#: Seconds between attempts to reach a cluster that could not be reached or was lost.
RETRY_S = 60.0
#: The cluster has this many budgets (and at least `REMOTE_MIN_S`) per frame before the frame is analysed here;
#: below the daemon's hung limit (30 budgets, at least 60 s), which a finish phase waiting for it would trip.
REMOTE_BUDGETS = 10
REMOTE_MIN_S = 20.0
#: The `Analysis.model_ids` a worker's analysis must share with the daemon's.
MODEL_FILE_IDS = ("profile", "segmentation", "classifier")


@dataclass
class Remote:
    """A frame's analysis under way on the cluster."""

    future: Any  # distributed.Future of the Analysis
    sent_at: float  # time.monotonic() before the pixels left


class Offloader:
    """The daemon's connection to a Dask cluster and the rule for sending it frames.

    Parameters
    ----------
    address
        The scheduler (``tcp://host:8786``, ``tls://…``, ``inproc://…``).
    profile
        The profile the workers load (an installed name or a directory they can read) — the
        daemon's own; analyses from other model files are refused.
    budget_ms
        The daemon's per-frame budget.
    offload_after_ms
        A frame that waited longer than this before its prepare phase is sent; default half the budget.
    model_ids
        The local analyser's `Analysis.model_ids`; a remote analysis must name the same files.

    Examples
    --------
    >>> offload = Offloader("tcp://gpu-server:8786", "nanoparticles", budget_ms=500)  # doctest: +SKIP
    >>> offload.start()  # connects in the background; frames stay here until it has  # doctest: +SKIP
    >>> Pipeline(analyser, state, budget_ms=500, offload=offload)  # doctest: +SKIP
    """

    def __init__(self, address: str, profile: str | Path, *, budget_ms: float, offload_after_ms: float | None = None,
                 model_ids: dict[str, str] | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.address = address
        from latticewatch.runtime.cluster import AnalyserSpec  # distributed is imported only with a scheduler

        # the analyser's default backend and one inference thread per task: the cluster is sized by its workers
        self.spec = AnalyserSpec(str(profile))
        self.after_s = (offload_after_ms if offload_after_ms is not None else budget_ms / 2) / 1000
        self.timeout_s = max(REMOTE_BUDGETS * budget_ms / 1000, REMOTE_MIN_S)
        self.connect_timeout_s = connect_timeout_s
        self.model_ids = _comparable(model_ids)
        self.counters = {"offloaded": 0, "analysed_remotely": 0, "analysed_here_after_failure": 0}
        self._client: Any = None
        self._lock = threading.Lock()
        self._connecting: threading.Thread | None = None
        self._paused_until = 0.0  # no frame is sent before this (time.monotonic())
        self._refused = False  # the cluster's profile is not ours: never again this run
        self._closed = False

    def start(self) -> None:
        """Connect in the background: the daemon starts at once, and analyses here until connected."""
        if self._client is None:
            self._connect_later()

    def _connect_later(self) -> None:
        with self._lock:
            if self._closed or (self._connecting is not None and self._connecting.is_alive()):
                return
            self._connecting = threading.Thread(target=self._connect, name="latticewatch-offload-connect",
                                                daemon=True)
            self._connecting.start()

    def _connect(self) -> None:
        from latticewatch.runtime.cluster import AnalyserPlugin, open_client

        client = None
        try:
            client = open_client(self.address, timeout=self.connect_timeout_s)
            client.register_plugin(AnalyserPlugin(self.spec))  # each worker loads the profile once, now
        except Exception as err:  # noqa: BLE001 - unreachable (an OSError), or the workers cannot load the profile
            log.warning("offload: the Dask scheduler %s cannot be used (%s: %s); every frame is analysed here, "
                        "and it is tried again in %.0f s", self.address, type(err).__name__, err, RETRY_S)
            with self._lock:
                self._paused_until = time.monotonic() + RETRY_S
            if client is not None:
                _close_quietly(client)
            return
        with self._lock:
            stale, self._client = self._client, client
            self._paused_until = 0.0
            closed = self._closed
        for old in (stale, client if closed else None):
            if old is not None:
                _close_quietly(old)
        if not closed:
            log.info("offload: connected to the Dask scheduler %s; frames waiting longer than %.0f ms are sent to it",
                     self.address, self.after_s * 1000)

    @property
    def connected(self) -> bool:
        """Is a cluster there to take frames now?"""
        client = self._client
        return client is not None and client.status == "running"

    def wants(self, waited_s: float) -> bool:
        """Is a frame that waited ``waited_s`` to be sent now (the rule, and a cluster to send it to)?"""
        if waited_s <= self.after_s or self._refused or time.monotonic() < self._paused_until:
            return False
        client = self._client
        if client is not None and client.status in ("running", "connecting"):
            return client.status == "running"  # connecting: lost a moment ago, it reconnects by itself
        self._connect_later()  # never reached, or it gave up reconnecting
        return False

    def send(self, frame: Frame) -> Remote | None:
        """The frame's pixels on their way to the cluster's analysis; ``None`` when they could not be sent."""
        from latticewatch.runtime.cluster import analyse_pixels

        sent_at = time.monotonic()
        client = self._client
        try:
            # scattered, not put in the task: a frame is megabytes, and the scheduler only needs to know where it is
            data = client.scatter(frame, hash=False, timeout=self.connect_timeout_s)
            future = client.submit(analyse_pixels, data, self.spec, pure=False)
        except Exception as err:  # noqa: BLE001 - whatever the cluster does, the frame is analysed here
            self._lost(f"{frame.frame_id}: could not be sent: {type(err).__name__}: {err}")
            return None
        with self._lock:
            self.counters["offloaded"] += 1
        return Remote(future, sent_at)

    def collect(self, frame: Frame, remote: Remote) -> Analysis | None:
        """The cluster's analysis of ``frame``, waited for; ``None``: analyse it here (the reason is logged)."""
        try:
            analysis = remote.future.result(timeout=max(0.0, remote.sent_at + self.timeout_s - time.monotonic()))
        except LatticewatchError as err:  # the frame's own problem: the local analysis quarantines it
            log.info("offload: %s: refused by the cluster (%s); analysed here", frame.frame_id, err)
            return self._fell_back()
        except Exception as err:  # noqa: BLE001 - cancelled (scheduler lost), timed out, worker died ...
            self._lost(f"{frame.frame_id}: no analysis from the cluster: {type(err).__name__}: {err}")
            return self._fell_back()
        found = _comparable(analysis.model_ids)
        if self.model_ids is not None and found != self.model_ids:
            if not self._refused:
                log.error("offload: the cluster %s analyses with %s, this daemon with %s; its analyses are refused "
                          "and every frame is analysed here (install the same profile on the workers)",
                          self.address, found, self.model_ids)
            self._refused = True
            return self._fell_back()
        with self._lock:
            self.counters["analysed_remotely"] += 1
        return analysis

    def _fell_back(self) -> None:
        with self._lock:
            self.counters["analysed_here_after_failure"] += 1

    def _lost(self, why: str) -> None:
        with self._lock:
            pause = time.monotonic() >= self._paused_until  # said once per outage, not once per frame in flight
            self._paused_until = time.monotonic() + RETRY_S
        if pause:
            log.warning("offload: %s; the frames in flight are analysed here, and none is sent for %.0f s",
                        why, RETRY_S)

    def close(self) -> None:
        """Disconnect (frames still out were collected by the finish phase, or are analysed at the next start)."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)


def _comparable(model_ids: dict[str, str] | None) -> dict[str, str] | None:
    """The ids naming the profile and its model files; how they run may differ (a GPU worker runs TensorRT, the PC
    ONNX Runtime)."""
    return None if model_ids is None else {k: v for k, v in model_ids.items() if k in MODEL_FILE_IDS}


def _close_quietly(client: Any) -> None:
    try:
        client.close(timeout=CONNECT_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - a lost cluster must not fail the daemon's orderly stop
        log.debug("offload: closing the client: %s", err)


def open_offloader(scheduler: str | None, profile: str | Path, *, budget_ms: float, offload_after_ms: float | None,
                   model_ids: dict[str, str]) -> Offloader | None:
    """The daemon's offloader for ``[runtime] scheduler``, connecting in the background; ``None`` without one.

    Examples
    --------
    >>> open_offloader(None, "nanoparticles", budget_ms=2000, offload_after_ms=None, model_ids={}) is None
    True
    """
    if scheduler is None:
        return None
    offloader = Offloader(scheduler, profile, budget_ms=budget_ms, offload_after_ms=offload_after_ms,
                          model_ids=model_ids)
    offloader.start()
    return offloader
