"""The inference thread: the one thread that owns the Engine, runs submitted jobs between frames
and advances every active stream one frame per round."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from types import GeneratorType

from ..errors import EngineError, WorkerCrashedError
from .core import AudioFrame, Engine, Stream
from .slots import SlotsBusyError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    fn: Callable
    args: tuple
    future: Future
    wait_for_slot: bool
    steps: Generator | None = None  # set while a multi-step job (a chunked prefill) runs


class InferenceWorker:
    """The one thread that owns the Engine. Jobs (encode audio, prefill, start or finish a reply)
    run between frames. A job that returns a generator runs one step (one prefill chunk) per
    round, so a long prefill does not stall the replies in progress. Each round, all active
    streams advance one frame together. Results go back through futures and thread-safe callbacks.
    """

    def __init__(self, engine_factory: Callable[[], Engine], name: str = "csm-inference", max_backlog_frames: int = 25):
        self.max_backlog_frames = max_backlog_frames  # a stream this far ahead of its listener waits
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[Stream, Callable]] = {}
        self._running: list[_Job] = []  # multi-step jobs in progress
        self._parked: list[_Job] = []  # waiting for a free cache slot
        self._crash: BaseException | None = None
        self._stopping = False
        self.engine: Engine | None = None
        self.ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine_factory,), name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, wait_for_slot: bool = False) -> Future:
        """Run fn(engine, *args) on the worker between frames. With wait_for_slot, a job that
        finds no cache slot free waits until one is instead of failing."""
        future: Future = Future()
        if self._crash is not None or self._stopping:
            future.set_exception(WorkerCrashedError(f"the inference worker is not running ({self._crash or 'stopped'})"))
            return future
        self._jobs.put(_Job(fn, args, future, wait_for_slot))
        return future

    def add_stream(self, stream: Stream, on_frame: Callable[[AudioFrame | None | BaseException], None]) -> None:
        """Worker-side only (call from a submitted job): on_frame gets each frame, then None at
        the end, or an exception."""
        self._streams[id(stream)] = (stream, on_frame)

    def remove_stream(self, stream: Stream) -> None:
        self._streams.pop(id(stream), None)

    def stop(self, timeout: float | None = 10) -> None:
        self._stopping = True
        self._jobs.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._crash is None

    def _run(self, engine_factory) -> None:
        try:
            self.engine = engine_factory()
        except BaseException as e:  # noqa: BLE001 - reported through the future
            self._crash = e
            self.ready.set_exception(e)
            return
        self.ready.set_result(self.engine)
        try:
            while True:
                for job in self._parked[:]:
                    self._parked.remove(job)
                    self._advance(job)
                ready = [entry for entry in self._streams.values() if entry[0].produced - entry[0].consumed < self.max_backlog_frames]
                if ready or self._running:
                    timeout = 0
                elif self._streams or self._parked:  # waiting on slow listeners or for a free slot
                    timeout = 0.005
                else:
                    timeout = None
                if not self._take_jobs(timeout):
                    break
                for job in self._running[:]:
                    self._advance(job)
                if ready:
                    self._step_streams([entry for entry in ready if id(entry[0]) in self._streams])
        except BaseException as e:  # noqa: BLE001
            log.exception("the inference worker crashed")
            self._crash = e
        finally:
            error = WorkerCrashedError(f"the inference worker stopped ({self._crash or 'closed'})")
            for stream, on_frame in self._streams.values():
                on_frame(error)
            self._streams.clear()
            pending = self._running + self._parked
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    pending.append(job)
            for job in pending:
                if not job.future.done():
                    job.future.set_exception(error)

    def _take_jobs(self, timeout: float | None) -> bool:
        """Start the queued jobs (waiting up to `timeout` for the first); False when stopping."""
        while True:
            try:
                job = self._jobs.get(timeout=timeout) if timeout != 0 else self._jobs.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.future.set_running_or_notify_cancel():
                self._advance(job)
            timeout = 0

    def _advance(self, job: _Job) -> None:
        """Start a job or run its next step; settle its future when it ends."""
        try:
            if job.steps is None:
                result = job.fn(self.engine, *job.args)
                if not isinstance(result, GeneratorType):
                    job.future.set_result(result)
                    return
                job.steps = result  # its steps run one per round, from the next round on
                self._running.append(job)
                return
            next(job.steps)
            return
        except StopIteration as done:
            job.future.set_result(done.value)
        except SlotsBusyError as e:
            if job.wait_for_slot:  # raised before any work (slot_for comes first): start over later
                job.steps = None
                self._parked.append(job)
            else:
                job.future.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            job.future.set_exception(e)
        if job in self._running:
            self._running.remove(job)

    def _step_streams(self, active: list[tuple[Stream, Callable]]) -> None:
        """One frame for every active stream, batched; if the batch fails, each stream alone, so
        one bad stream fails by itself and the others go on."""
        if not active:
            return
        try:
            results = self.engine.step_many([stream for stream, _ in active])
        except Exception:  # noqa: BLE001 - isolate the failing stream below
            results = []
            for stream, on_frame in active:
                try:
                    results.append(self.engine.step_many([stream])[0])
                except Exception as e:  # noqa: BLE001 - that stream fails, the worker goes on
                    log.exception("generation failed")
                    stream.done = True
                    self._streams.pop(id(stream), None)
                    on_frame(EngineError(f"generation failed: {e}"))
                    results.append(e)
        for (stream, on_frame), frame in zip(active, results):
            if isinstance(frame, Exception):
                continue
            if frame is not None:
                stream.produced += 1
                on_frame(frame)
            if stream.done:
                self._streams.pop(id(stream), None)
                on_frame(None)
