"""The inference thread: the one thread that owns the Engine, runs submitted jobs between frames
and advances every active stream one frame per round."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from types import GeneratorType

from ..errors import EngineError, WorkerCrashedError
from .core import AudioFrame, Engine, Stream
from .preempt import Suspended, resume, snapshot_bytes, suspend
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
    parked: bool = False  # found no free cache slot and has not had one since


@dataclass(eq=False)
class _Out:
    """A suspended stream (preempt.py) and its consumer."""

    suspended: Suspended
    on_frame: Callable
    waiting: bool = False  # its listener caught up: it waits for a slot to go on


class InferenceWorker:
    """The one thread that owns the Engine. Jobs (encode audio, prefill, start or finish a reply)
    run between frames. A job that returns a generator runs one step (one prefill chunk) per
    round, so a long prefill does not stall the replies in progress. Each round, all active
    streams advance one frame together. Results go back through futures and thread-safe callbacks.

    Nothing one caller does stops the thread: a frame callback that raises (its event loop has
    died, say) ends that stream alone, and a failed frame step fails only the streams at fault.

    A slow listener slows only its own stream. A stream `max_backlog_frames` ahead of its
    listener is paused (skipped by the frame steps). When replies wait for a cache slot (jobs
    parked with wait_for_slot, or suspended streams that want to go on) and every slot is in
    use, paused streams are suspended, the longest paused first: each gives its slot up and
    keeps its state (preempt.py). Once its listener is within `resume_backlog_frames` of it, a
    suspended stream waits for a slot like any reply (after the parked jobs: their listeners
    have heard nothing yet, its listener still has audio) and goes on exactly where it was.
    The host copies that suspended streams keep are bounded by `max_suspended_bytes`: beyond
    it, a paused stream keeps its slot and the waiting reply waits.
    """

    def __init__(
        self, engine_factory: Callable[[], Engine], name: str = "csm-inference", max_backlog_frames: int = 25,
        resume_backlog_frames: int | None = None, max_suspended_bytes: int = 2 * 2**30,
    ):
        self.max_backlog_frames = max_backlog_frames  # a stream this far ahead of its listener waits
        self.resume_backlog_frames = resume_backlog_frames  # None: half of max_backlog_frames
        self.max_suspended_bytes = max_suspended_bytes
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, tuple[Stream, Callable]] = {}  # streams that hold a cache slot
        self._suspended: dict[int, _Out] = {}  # streams that gave their slot up (preempt.py)
        self.suspensions = 0  # streams suspended so far (read by the server's metrics)
        self._paused_since: dict[int, float] = {}  # when each paused stream last stopped generating
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

    @property
    def suspended(self) -> int:
        """Streams suspended now (thread-safe read)."""
        return len(self._suspended)

    def stream_counts(self) -> dict[str, int]:
        """Worker-side only (call from a submitted job): streams by state. active and paused
        hold a slot; suspended do not; waiting: replies and suspended streams waiting for one."""
        paused = sum(self._paused(s) for s, _ in self._streams.values())
        parked = sum(job.parked for job in self._parked + self._running)
        waiting = parked + sum(out.waiting for out in self._suspended.values())
        return {"active": len(self._streams) - paused, "paused": paused, "suspended": len(self._suspended), "waiting": waiting}

    def remove_stream(self, stream: Stream) -> None:
        """Worker-side only: forget a stream (its consumer closes it on the engine)."""
        self._streams.pop(id(stream), None)
        self._suspended.pop(id(stream), None)
        self._paused_since.pop(id(stream), None)

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
                ready = [entry for entry in self._streams.values() if not self._paused(entry[0])]
                if ready or self._running:
                    timeout = 0
                elif self._streams or self._parked or self._suspended:  # slow listeners, or waiting for a slot
                    timeout = 0.005
                else:
                    timeout = None
                if not self._take_jobs(timeout):
                    break
                for job in self._running[:]:
                    self._advance(job)
                self._preempt()
                if ready:
                    self._step_streams([entry for entry in ready if id(entry[0]) in self._streams])
        except BaseException as e:  # noqa: BLE001
            log.exception("the inference worker crashed")
            self._crash = e
        finally:
            error = WorkerCrashedError(f"the inference worker stopped ({self._crash or 'closed'})")
            for stream, on_frame in [*self._streams.values(), *((o.suspended.stream, o.on_frame) for o in self._suspended.values())]:
                self._deliver(stream, on_frame, error)
            self._streams.clear()
            self._suspended.clear()
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
                job.parked = False  # past slot_for
                return
        except StopIteration as done:
            job.future.set_result(done.value)
        except SlotsBusyError as e:
            if job.wait_for_slot:  # raised before any work (slot_for comes first): start over later
                job.steps = None
                job.parked = True
                self._parked.append(job)
            else:
                job.future.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - the caller gets it
            job.future.set_exception(e)
        if job in self._running:
            self._running.remove(job)

    # --- preemption (preempt.py) -------------------------------------------------------------

    def _paused(self, stream: Stream) -> bool:
        return stream.produced - stream.consumed >= self.max_backlog_frames

    def _preempt(self) -> None:
        """Suspend paused streams for the replies that wait for a slot, then let suspended
        streams whose listeners caught up take the slots the parked jobs leave."""
        now = time.monotonic()
        since = self._paused_since
        self._paused_since = {key: since.get(key, now) for key, (stream, _) in self._streams.items() if self._paused(stream)}
        resume_at = self.resume_backlog_frames
        if resume_at is None:
            resume_at = self.max_backlog_frames // 2
        for out in self._suspended.values():
            stream = out.suspended.stream
            out.waiting = out.waiting or stream.produced - stream.consumed <= resume_at
        resuming = [(key, out) for key, out in self._suspended.items() if out.waiting]
        if not self._parked and not resuming:
            return
        slots = self.engine.slot_pool.slots
        idle = sum(not slot.in_use for slot in slots)
        need = len(self._parked) + len(resuming) - idle
        if need > 0:
            held = sum(out.suspended.nbytes for out in self._suspended.values())
            for key in sorted(self._paused_since, key=self._paused_since.get):
                if need <= 0:
                    break
                stream, _ = self._streams[key]
                size = snapshot_bytes(self.engine, stream)
                if held + size > self.max_suspended_bytes:
                    continue
                if self._suspend(key):
                    held, need = held + size, need - 1
            idle = sum(not slot.in_use for slot in slots)
        # The parked jobs take their slots at their next step; the rest are for resumes.
        spare = idle - len(self._parked)
        for key, out in resuming:
            if spare <= 0:
                break
            spare -= self._resume(key, out)

    def _suspend(self, key: int) -> bool:
        stream, on_frame = self._streams.pop(key)
        self._paused_since.pop(key, None)
        try:
            self._suspended[key] = _Out(suspend(self.engine, stream), on_frame)
        except Exception as e:  # noqa: BLE001 - that stream fails by itself
            log.error("suspending a stream failed", exc_info=e)
            if self._deliver(stream, on_frame, EngineError(f"generation failed: {e}")):
                self.engine.finish(stream, None, None)
            return False
        self.suspensions += 1
        log.debug("suspended a stream %d frames ahead of its listener (slot %d)",
                  stream.produced - stream.consumed, self._suspended[key].suspended.slot)
        return True

    def _resume(self, key: int, out: _Out) -> bool:
        """Give a suspended stream a slot again; False if none can be had now."""
        try:
            stream = resume(self.engine, out.suspended)
        except SlotsBusyError:
            return False
        except Exception as e:  # noqa: BLE001 - that stream fails by itself
            log.error("resuming a stream failed", exc_info=e)
            del self._suspended[key]
            self._deliver(out.suspended.stream, out.on_frame, EngineError(f"generation failed: {e}"))
            return True
        del self._suspended[key]
        self._streams[key] = (stream, out.on_frame)
        log.debug("resumed a stream in slot %d", stream.slot)
        return True

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
