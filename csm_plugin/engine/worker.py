"""The inference thread: the one thread that owns the Engine, runs submitted jobs between frames
and advances every active stream one frame per round."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future
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
    cancelled: bool = False  # its caller gave up: stop it at the next step (see cancel)


class InferenceWorker:
    """The one thread that owns the Engine. Jobs (encode audio, prefill, start or finish a reply)
    run between frames. A job that returns a generator runs one step (one prefill chunk) per
    round, so a long prefill does not stall the replies in progress. Each round, all active
    streams advance one frame together. Results go back through futures and thread-safe callbacks.

    Nothing one caller does stops the thread: a frame callback that raises (its event loop has
    died, say) ends that stream alone, and a failed frame step fails only the streams at fault.
    """

    def __init__(self, engine_factory: Callable[[], Engine], name: str = "csm-inference", max_backlog_frames: int = 25):
        self.max_backlog_frames = max_backlog_frames  # a stream this far ahead of its listener waits
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[Stream, Callable]] = {}
        self._running: list[_Job] = []  # multi-step jobs in progress
        self._parked: list[_Job] = []  # waiting for a free cache slot
        self._jobs_by_future: dict[int, _Job] = {}  # submitted and not settled yet (for cancel)
        self._crash: BaseException | None = None
        self._stopping = False
        self._closed = False  # set, under _lock, once no job will ever run again
        self._lock = threading.Lock()
        self.engine: Engine | None = None
        self.ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(engine_factory,), name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, wait_for_slot: bool = False) -> Future:
        """Run fn(engine, *args) on the worker between frames. With wait_for_slot, a job that
        finds no cache slot free waits until one is instead of failing."""
        future: Future = Future()
        with self._lock:  # the final drain takes the same lock: no job slips in after it
            if self._closed or self._crash is not None or self._stopping:
                future.set_exception(WorkerCrashedError(f"the inference worker is not running ({self._crash or 'stopped'})"))
                return future
            job = _Job(fn, args, future, wait_for_slot)
            self._jobs_by_future[id(future)] = job
            self._jobs.put(job)
        future.add_done_callback(lambda f: self._jobs_by_future.pop(id(f), None))
        return future

    def cancel(self, future: Future) -> None:
        """Give up on a submitted job (thread-safe): it does not start, or, if it is a multi-step
        job in progress, stops at its next step (its generator is closed, so its cleanup runs);
        its future then ends cancelled. A job that already finished is left as it is."""
        job = self._jobs_by_future.get(id(future))
        if job is not None:
            job.cancelled = True
        future.cancel()

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
            with self._lock:
                self._closed = True
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
            for stream, on_frame in list(self._streams.values()):
                self._deliver(stream, on_frame, error)
            self._streams.clear()
            with self._lock:  # after this, submit() refuses: every job is settled here or there
                self._closed = True
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
            if job.cancelled:
                if job.steps is not None:
                    job.steps.close()  # its cleanup (finally / except) runs now
                job.future.set_exception(CancelledError())
            elif job.steps is None:
                result = job.fn(self.engine, *job.args)
                if not isinstance(result, GeneratorType):
                    job.future.set_result(result)
                    return
                job.steps = result  # its steps run one per round, from the next round on
                self._running.append(job)
                return
            else:
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

    def _deliver(self, stream: Stream, on_frame: Callable, item) -> bool:
        """Hand a frame (None at the end, or an error) to the stream's consumer. A consumer that
        cannot take it (its event loop is closed, its callback raises) loses its stream, which
        is closed on the engine; nobody else notices."""
        try:
            on_frame(item)
            return True
        except Exception:  # noqa: BLE001 - the consumer's failure is its own
            log.warning("a stream's consumer is gone; closing that stream", exc_info=True)
            self._streams.pop(id(stream), None)
            if self.engine is not None:
                try:
                    self.engine.finish(stream, None, None)
                except Exception:  # noqa: BLE001
                    log.exception("closing an orphaned stream failed")
            return False

    def _step_streams(self, active: list[tuple[Stream, Callable]]) -> None:
        """One frame for every active stream, batched (the engine retries a failed batch stream
        by stream; a stream that fails alone ends with an EngineError, the others go on)."""
        if not active:
            return
        try:
            results = self.engine.step_many([stream for stream, _ in active])
        except Exception:  # noqa: BLE001 - step_many isolates streams itself; this guards the thread
            log.exception("a frame step failed outside the engine's own retry")
            results = []
            for stream, _ in active:
                try:
                    results.extend(self.engine.step_many([stream]))
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        for (stream, on_frame), frame in zip(active, results):
            if isinstance(frame, Exception):
                log.error("generation failed for one stream", exc_info=frame)
                self._streams.pop(id(stream), None)
                if self._deliver(stream, on_frame, EngineError(f"generation failed: {frame}")):
                    self.engine.finish(stream, None, None)
                continue
            if frame is not None:
                stream.produced += 1
                if not self._deliver(stream, on_frame, frame):
                    continue
            if stream.done:
                self._streams.pop(id(stream), None)
                self._deliver(stream, on_frame, None)
