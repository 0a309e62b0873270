"""Runners: wire sources → analyser phases → ledger, event log and sinks.

One interface (``run(sources, stop) -> RunStats``), two implementations sharing the per-frame
work in `latticewatch.runtime.pipeline.Pipeline`:

* `InlineRunner`: one thread, deterministic; sources are drained one after another. Tests and
  scripts use it.
* `PipelinedRunner`: the daemon's. A thread per source, then three stage threads joined by
  bounded queues: prepare (validate, median, normalise, resample) → segment (the U-Net) →
  finish. Finishing is split: the CPU-bound part (isolate, features, classify, the events) runs on
  a pool of threads, one per CPU core, several frames at once; a record thread then writes each
  frame's ledger row, event log entry and sink calls strictly in the order the frames arrived.

Timing is middleware: the runner measures each phase around the analyser's calls (never inside
stage code), plus the time each frame spent waiting, and charges them to the frame. A frame
whose phases took longer than ``budget_ms`` in total is an *overrun* (counted, and marked in its
frame event).

When behind, the pipelined runner degrades in this order — it never drops a frame:

1. **Batch larger.** The segment thread takes every prepared frame waiting (up to
   ``max_batch``) and runs same-shape frames through the network in one call.
2. **Analyse elsewhere** (with ``[runtime] scheduler``). A frame that waited longer than
   ``offload_after_ms`` goes to the Dask cluster (`latticewatch.runtime.offload`); it keeps its
   place, and is recorded here in its turn.
3. **Analyse later.** Stream frames (non-replayable sources; already spooled to disk on arrival)
   that find the prepare queue full are *deferred*: their pixels leave memory, and they are
   analysed, oldest first, whenever the prepare queue runs empty — live frames go first. Folder
   frames are not deferred: the source simply waits, the files stay on disk.
4. **Never drop.** Deferred frames survive a restart (ledger ``seen`` + spool) and are analysed
   then.

A bad frame sinks alone: an analyser error quarantines that frame with its reason and an error
event. Only the ledger, event log or state directory failing stops the runner (it re-raises).

The sinks (ZeroMQ publisher, metrics, dashboard) are fed by the event log
(`latticewatch.runtime.eventlog.EventLog`): they get each frame's typed events once they are durable.

The archive (optional) is fed after publication and runs on its own thread
(`latticewatch.runtime.archiving`); the archive being slow or unavailable never stops a phase.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Protocol

from latticewatch.models.backends import cpu_threads
from latticewatch.runtime.pipeline import Pipeline, RunStats
from latticewatch.sources.base import Source, StopFlag

log = logging.getLogger(__name__)


class Runner(Protocol):
    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats: ...


class Busy:
    """Which phase is at work on a frame since when: how the daemon tells a hung pipeline from a slow one.

    Examples
    --------
    >>> busy = Busy()
    >>> with busy("segment"):
    ...     list(busy.ages())
    ['segment']
    >>> busy.ages()
    {}
    """

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._since[phase] = time.monotonic()
        try:
            yield
        finally:
            self._since.pop(phase, None)

    def ages(self) -> dict[str, float]:
        """Seconds each busy phase has spent on its current frame (or batch)."""
        now = time.monotonic()
        return {phase: now - since for phase, since in list(self._since.items())}


class InlineRunner:
    """Everything in the calling thread, one frame at a time; sources drained one after another.

    Examples
    --------
    >>> stats = InlineRunner(pipeline).run([MemorySource([image])], threading.Event())  # doctest: +SKIP
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.busy = Busy()
        self.started = threading.Event()

    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats:
        p = self.pipeline
        self.started.set()
        for key in p.recover(sources):
            job = p.resume(key)
            if job is not None:
                p.stats.add(resumed=1)
                with self.busy("process"):
                    p.process(job)
        for source in sources:
            for item in source.frames(stop, p.skip):
                job = p.admit(source, item)
                if job is not None:
                    with self.busy("process"):
                        p.process(job)
                if stop.is_set():
                    break
        p.snapshot_sources(sources)
        return p.stats


_DONE = object()


class _AnyOf:
    """A stop flag that is set when any of its flags is."""

    def __init__(self, *flags: StopFlag) -> None:
        self.flags = flags

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)


class PipelinedRunner:
    """Threads and bounded queues between prepare, segment and finish (see the module docs).

    On ``stop`` the sources end, frames already queued are finished, and deferred frames stay
    spooled for the next run. When every source ends by itself, deferred frames are analysed
    before `run` returns.

    Parameters
    ----------
    pipeline
        The shared per-frame work.
    queue_size
        Capacity of each queue between phases.
    max_batch
        Most frames segmented in one network call when behind.
    finish_workers
        Frames concluded at once (isolate, features, classify, events); default one per CPU core
        (`latticewatch.models.backends.cpu_threads`). Their results are recorded in arrival order whatever the order
        they finish in.

    Examples
    --------
    >>> stats = PipelinedRunner(pipeline).run([FolderSource("incoming")], stop)  # doctest: +SKIP
    """

    def __init__(self, pipeline: Pipeline, *, queue_size: int = 4, max_batch: int = 4,
                 finish_workers: int | None = None) -> None:
        self.pipeline = pipeline
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.finish_workers = cpu_threads(finish_workers)
        self._to_prepare: queue.Queue = queue.Queue(queue_size)
        self._to_segment: queue.Queue = queue.Queue(queue_size)
        self._to_finish: queue.Queue = queue.Queue(queue_size)
        # frames in the finish phase, in arrival order, each with its conclusion under way; at most
        # twice the pool's threads: every thread busy, and as many concluded frames waiting their turn
        self._to_record: queue.Queue = queue.Queue()
        self._finishing = threading.Semaphore(2 * self.finish_workers)
        self._pool: ThreadPoolExecutor | None = None
        self._deferred: collections.deque[str] = collections.deque()
        self._sources_done = threading.Event()
        self._fatal = threading.Event()
        self._failure: BaseException | None = None
        self._halt: StopFlag = self._fatal
        self.busy = Busy()
        self.started = threading.Event()  # set once the source and phase threads run

    def run(self, sources: Sequence[Source], stop: StopFlag) -> RunStats:
        p = self.pipeline
        resumed = p.recover(sources)
        self._deferred.extend(resumed)
        p.stats.add(resumed=len(resumed))
        self._halt = _AnyOf(stop, self._fatal)
        self._pool = ThreadPoolExecutor(self.finish_workers, thread_name_prefix="latticewatch-conclude")
        pumps = [self._thread(f"source-{s.name}", self._pump, s) for s in sources]
        stages = [self._thread(name, loop) for name, loop in
                  (("prepare", self._prepare_loop), ("segment", self._segment_loop), ("finish", self._finish_loop),
                   ("record", self._record_loop))]
        for t in (*pumps, *stages):
            t.start()
        self.started.set()
        for t in pumps:
            t.join()
        self._sources_done.set()
        for t in stages:
            while t.is_alive() and not self._fatal.is_set():
                t.join(0.2)
        # after a failure or `abandon`, frames not yet concluded stay `seen` for the next start
        self._pool.shutdown(wait=not self._fatal.is_set(), cancel_futures=True)
        p.snapshot_sources(sources)
        if self._failure is not None:
            raise self._failure
        return p.stats

    def abandon(self) -> None:
        """Leave the frames still queued (a shutdown that took too long): each phase stops after its current frame.

        They stay ``seen`` in the ledger (stream frames spooled) and are analysed at the next start.
        """
        self._fatal.set()

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting before each phase, and deferred (for status events and metrics)."""
        return {"prepare": self._to_prepare.qsize(), "segment": self._to_segment.qsize(),
                "finish": self._to_finish.qsize(), "deferred": len(self._deferred)}

    def _thread(self, name: str, target: Callable, *args) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as err:  # ledger/event log/state dir failures: stop loudly
                log.critical("%s thread failed: %s", name, err, exc_info=True)
                self._failure = self._failure or err
                self._fatal.set()

        return threading.Thread(target=guarded, name=f"latticewatch-{name}", daemon=True)

    def _put(self, q: queue.Queue, item: object) -> bool:
        """Blocking put that gives up when another thread failed (so nothing hangs on a dead consumer)."""
        while not self._fatal.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, source: Source) -> None:
        p = self.pipeline
        for item in source.frames(self._halt, p.skip):
            job = p.admit(source, item)
            if job is None:
                continue
            if job.spool is None:
                # a folder waits when the pipeline is full: its files stay on disk
                while not self._halt.is_set():
                    try:
                        self._to_prepare.put(job, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                continue
            try:
                self._to_prepare.put_nowait(job)
            except queue.Full:
                self._deferred.append(job.spool)  # degrade step 2: the pixels are on disk; memory is freed
                p.stats.add(deferred=1)

    def _prepare_loop(self) -> None:
        p = self.pipeline
        while not self._fatal.is_set():
            try:
                job = self._to_prepare.get(timeout=0.05)
            except queue.Empty:
                if self._deferred and not self._halt.is_set():
                    job = p.resume(self._deferred.popleft())  # analyse later: only when live frames leave room
                    if job is None:
                        continue
                elif self._sources_done.is_set():
                    break
                else:
                    continue
            with self.busy("prepare"):
                prepared = p.prepare(job)
            if prepared and not self._put(self._to_segment, job):
                return
        self._put(self._to_segment, _DONE)

    def _segment_loop(self) -> None:
        while not self._fatal.is_set():
            job = self._to_segment.get()
            if job is _DONE:
                break
            batch = [job]
            done = False
            while len(batch) < self.max_batch:  # degrade step 1: whatever is waiting goes together
                try:
                    more = self._to_segment.get_nowait()
                except queue.Empty:
                    break
                if more is _DONE:
                    done = True
                    break
                batch.append(more)
            with self.busy("segment"):
                self.pipeline.segment(batch)
            for j in batch:
                if not self._put(self._to_finish, j):
                    return
            if done:
                break
        self._put(self._to_finish, _DONE)

    def _finish_loop(self) -> None:
        """Start concluding each frame on the pool, as many at once as it has room for."""
        while not self._fatal.is_set():
            job = self._to_finish.get()
            if job is _DONE:
                break
            while not self._finishing.acquire(timeout=0.1):
                if self._fatal.is_set():
                    return
            try:
                # a frame offloaded to the cluster is collected (and, if the cluster failed it, analysed) in its turn
                concluding = None if job.remote is not None else self._pool.submit(self.pipeline.conclude, job)
            except RuntimeError:
                if self._fatal.is_set():  # abandoned meanwhile, and `run` shut the pool: the frame stays `seen`
                    return
                raise
            self._to_record.put((job, concluding))
        self._to_record.put(_DONE)

    def _record_loop(self) -> None:
        """Record the frames in the order they arrived: ledger, event log, sinks, archive."""
        while not self._fatal.is_set():
            item = self._to_record.get()
            if item is _DONE:
                break
            job, concluding = item
            with self.busy("finish"):  # from waiting for this frame's conclusion until it is recorded
                try:
                    concluded = None if concluding is None else concluding.result()
                except CancelledError:  # abandoned (`run` cancels what has not started): stays `seen`
                    return
                self.pipeline.finish(job, concluded)
            self._finishing.release()
