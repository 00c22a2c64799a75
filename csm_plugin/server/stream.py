"""The WebSocket conversation stream: GET /v1/conversations/{id}/stream (docs/protocol.md).

One Connection per socket. Its receive loop handles control messages in order; a reply runs in a
task of its own so that `interrupt` is heard while audio flows. Every send goes through one lock,
so a `chunk` header and its PCM are adjacent and history updates reach the client in the order
they happened. A bad message gets an `error` reply and changes nothing else; a socket that goes
away cancels its reply at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from aiohttp import WSCloseCode, WSMsgType, web

from ..conversation.protocol import (
    CONVERSATION_ID_RULE,
    AddSegment,
    Close,
    Code,
    Interrupt,
    Open,
    ProtocolError,
    Restore,
    SegmentIn,
    Speak,
    chunk_header,
    dumps,
    error_code,
    events_out,
    parse_client_message,
    parse_voices,
    request_id,
    segment_out,
    valid_conversation_id,
)
from ..conversation.types import FRAME_MS, AudioChunk
from ..errors import CSMError
from .app import STATE, ServerState
from .auth import Principal
from .routes import authenticate, check_ready, check_style, check_text, error_response, reply_ms, segment_from_wire
from .sessions import Session, add_turn, voice_segments

log = logging.getLogger(__name__)

CLOSE_SUPERSEDED = 4000  # another connection took this conversation over
CLOSE_IDLE = 4002  # no client message and no reply for stream_idle_timeout_s (the client reopens on demand)


async def conversation_stream(request: web.Request) -> web.StreamResponse:
    """Authenticate and check the limits before upgrading: a refused client gets a plain HTTP
    error (401, 429, 503) and the server does no work for it."""
    state = request.app[STATE]
    try:
        principal = authenticate(request)
        conversation_id = request.match_info["conversation_id"]
        if not valid_conversation_id(conversation_id):
            raise ProtocolError(Code.BAD_MESSAGE, CONVERSATION_ID_RULE)
        check_ready(state)
        if len(state.connections) >= state.limits.max_connections:
            raise ProtocolError(Code.TOO_MANY_CONNECTIONS, "the server has too many open streams; try another replica")
        if state.connections_per_key[principal.key_id] >= state.limits.max_conversations_per_key:
            raise ProtocolError(
                Code.TOO_MANY_CONVERSATIONS,
                f"at most {state.limits.max_conversations_per_key} open conversations per API key",
            )
    except ProtocolError as e:  # (counted by the error middleware)
        return error_response(e.code, e.message, retry_after_s=getattr(e, "retry_after_s", None))
    ws = web.WebSocketResponse(
        max_msg_size=state.limits.max_message_bytes, heartbeat=state.config.heartbeat_s, compress=False
    )
    await ws.prepare(request)
    _cap_send_buffer(request, state.limits.send_buffer_bytes)
    connection = Connection(state, request, ws, principal, conversation_id)
    await connection.run()
    return ws


def _cap_send_buffer(request: web.Request, size: int) -> None:
    """A small kernel send buffer, so that a reader that stops reading shows up as a send that
    waits within seconds of audio (autotuning would buffer megabytes first)."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class SlowConsumer(ProtocolError):
    """The reader fell behind real time and stayed there for send_timeout_s."""

    def __init__(self, message: str):
        super().__init__(Code.SLOW_CONSUMER, message)


class _Pacing:
    """When the reader should have taken each chunk: an ideal player starts playing the first
    chunk when it is ready and plays on at real time, waiting only when generation is late. A
    chunk not taken by the socket `lag_s` after that player would have started it means the
    reader is behind (it takes audio slower than real time, beyond what it may buffer)."""

    def __init__(self, lag_s: float):
        self.lag_s = lag_s
        self.play_end: float | None = None

    def due(self, now: float, generation_late: bool, duration_s: float) -> float:
        """The deadline of a chunk of `duration_s` ready at `now`; generation_late: the reply
        waited for it (generation set the pace, not the reader)."""
        if self.play_end is None or (generation_late and now > self.play_end):
            start = now
        else:
            start = self.play_end
        self.play_end = start + duration_s
        return start + self.lag_s


class Connection:
    def __init__(self, state: ServerState, request: web.Request, ws: web.WebSocketResponse, principal: Principal, conversation_id: str):
        self.state = state
        self.request = request
        self.ws = ws
        self.key_id = principal.key_id
        self.conversation_id = conversation_id
        self.session: Session | None = None
        self.speak_task: asyncio.Task | None = None
        self.generating = False  # from a speak request until its audio ends
        self.queued = False  # the reply waits for a place (admission.py)
        self.pending_interrupt: tuple[float | None, int] | None = None
        self.interrupted = False
        self._stopping = False  # the reply is being stopped on purpose: it ends with its `done`
        self._stop_reason: ProtocolError | None = None  # why (sent in that `done`), None: the client interrupted
        self._behind_since: float | None = None  # the reader fell behind real time then
        self._last_active = 0.0  # loop time of the last client message or reply activity (idle timeout)
        self._send_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        state = self.state
        state.connections.add(self)
        state.connections_per_key[self.key_id] += 1
        state.metrics.connections.set(len(state.connections))
        loop = asyncio.get_running_loop()
        idle_s = state.limits.stream_idle_timeout_s
        self._last_active = loop.time()
        try:
            while not self.ws.closed:
                try:
                    msg = await self.ws.receive(timeout=None if idle_s is None else max(0.05, self._last_active + idle_s - loop.time()))
                except asyncio.TimeoutError:
                    if self.generating or (self.speak_task is not None and not self.speak_task.done()):
                        self._last_active = loop.time()  # a reply is running: not idle
                    elif loop.time() - self._last_active >= idle_s:
                        log.info("closing a stream idle for %.0f s", idle_s)
                        with contextlib.suppress(Exception):
                            await self.ws.close(code=CLOSE_IDLE, message=b"idle")
                        break
                    continue
                self._last_active = loop.time()
                if msg.type == WSMsgType.TEXT:
                    try:
                        await self.handle(msg.data)
                    except ConnectionError:  # the client went away while we answered
                        break
                elif msg.type == WSMsgType.BINARY:
                    await self.send_error(None, Code.BAD_MESSAGE, "binary messages are not accepted; send JSON text messages")
                elif msg.type == WSMsgType.ERROR:
                    if WSCloseCode.MESSAGE_TOO_BIG in (getattr(msg.data, "code", None), self.ws.close_code):
                        state.metrics.errors.labels(Code.MESSAGE_TOO_BIG).inc()
                        log.info("closed a stream: a message was over %d bytes", state.limits.max_message_bytes)
                    break
                else:  # CLOSE, CLOSING, CLOSED: the client went away
                    break
        finally:
            await self.stop_speaking()
            if self.session is not None and self.session.connection is self:
                self.session.connection = None
                state.sessions.touch(self.session)
            state.connections.discard(self)
            state.connections_per_key[self.key_id] -= 1
            if state.connections_per_key[self.key_id] <= 0:
                del state.connections_per_key[self.key_id]
            state.metrics.connections.set(len(state.connections))
            if not self.ws.closed:
                with contextlib.suppress(Exception):
                    await self.ws.close()

    async def stop_speaking(self, reason: ProtocolError | None = None) -> None:
        """Stop a running reply now (the history keeps the frames sent) and wait for it. With a
        `reason`, the socket is still there: the reply ends with its `done` (reason
        "interrupted", the error saying why); without one (the socket is gone) it is just cancelled."""
        task = self.speak_task
        if task is not None and not task.done():
            if reason is not None:
                self._stopping, self._stop_reason = True, reason
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def supersede(self) -> None:
        """A newer connection takes this conversation over: a running reply ends first (with its
        `done` on this socket, so the history changes reach this client), then close 4000."""
        await self.stop_speaking(ProtocolError(Code.SUPERSEDED, "another socket took this conversation over"))
        if self.session is not None and self.session.connection is self:
            self.session.connection = None
        self.session = None
        with contextlib.suppress(Exception):
            await self.ws.close(code=CLOSE_SUPERSEDED, message=b"superseded by a newer connection")

    async def shut_down(self) -> None:
        """Server shutdown: cut any reply still running (its `done` says `draining`), close with
        1001 (going away)."""
        await self.stop_speaking(ProtocolError(Code.DRAINING, "the server is shutting down; the reply was cut"))
        with contextlib.suppress(Exception):
            await self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    # --- messages ------------------------------------------------------------------------

    async def handle(self, raw: str) -> None:
        rid = None
        try:
            message = parse_client_message(raw)
            rid = message.id
            await self.dispatch(message)
        except ProtocolError as e:
            await self.send_error(rid if rid is not None else request_id(raw), e.code, e.message)
        except CSMError as e:
            await self.send_error(rid, error_code(e), str(e))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("a message failed: %.200s", raw)
            await self.send_error(rid, Code.INTERNAL, "internal server error")

    async def dispatch(self, message) -> None:
        if isinstance(message, Open):
            await self.open(message)
        elif isinstance(message, Restore):
            await self.restore(message)
        elif isinstance(message, Close):
            await self.close(message)
        elif self.session is None:
            raise ProtocolError(Code.NOT_OPEN, "send 'open' (or 'restore') first")
        elif isinstance(message, Interrupt):
            await self.interrupt(message)
        else:
            await self.settle()
            if isinstance(message, AddSegment):
                await self.add_segment(message)
            elif isinstance(message, Speak):
                self.speak(message)

    async def settle(self) -> None:
        """Refuse a request while a reply is generating; wait out one that is just finishing."""
        if self.generating and self.session is not None and (self.session.conv.speaking or self.queued):
            raise ProtocolError(Code.BUSY, "a reply is in progress; wait for 'done' or send 'interrupt'")
        if self.speak_task is not None and not self.speak_task.done():
            with contextlib.suppress(BaseException):
                await asyncio.shield(self.speak_task)

    def _voices(self, voices: dict[str, str]) -> dict[int, str]:
        parsed = parse_voices(voices)
        unknown = sorted(set(parsed.values()) - self.state.voice_names)
        if unknown:
            raise ProtocolError(Code.UNKNOWN_VOICE, f"unknown voice(s) {unknown}; this server has {sorted(self.state.voice_names)}")
        return parsed

    async def _take(self, session: Session) -> None:
        """Attach `session` to this connection, superseding another connection that holds it."""
        other = session.connection
        if other is not None and other is not self:
            await other.supersede()
        session.connection = self
        self.session = session
        session.take_events()  # the client has this state already (a match or a restore)
        self.state.sessions.touch(session)

    async def _forget(self, session: Session) -> None:
        other = session.connection
        if other is not None and other is not self:
            await other.supersede()
        elif other is self:
            await self.stop_speaking()
            self.session = None
        await self.state.sessions.discard(session)

    async def _ready(self, rid: int | None, how: str) -> None:
        session = self.session
        voices = [segment_out(s, "voice") for s in voice_segments(session.conv)]
        await self.send({"type": "ready", "re": rid, "conversation": self.conversation_id, "state": how,
                         "voices": voices, "turns": len(session.turns())})

    async def open(self, message: Open) -> None:
        if self.session is not None:
            raise ProtocolError(Code.BAD_MESSAGE, "the conversation is already open on this stream")
        voices = self._voices(message.voices)
        sessions = self.state.sessions
        session = sessions.get(self.key_id, self.conversation_id)
        if session is not None and session.connection not in (None, self):
            # Its running reply ends (and is recorded) before the states are compared.
            await session.connection.supersede()
        if session is not None:
            if session.voices == voices and message.digest is not None and session.digest() == message.digest:
                await self._take(session)
                await self._ready(message.id, "resumed")
                return
            await self._forget(session)  # out of date: the client's copy wins
            raise ProtocolError(Code.UNKNOWN_CONVERSATION, "this server's copy of the conversation is out of date; restore it")
        if message.turns:
            raise ProtocolError(Code.UNKNOWN_CONVERSATION, "this server does not know the conversation; restore it")
        await self._take(sessions.create(self.key_id, self.conversation_id, voices))
        await self._ready(message.id, "created")

    async def restore(self, message: Restore) -> None:
        await self.settle()
        voices = self._voices(message.voices)
        limits = self.state.limits
        if len(message.history) > limits.max_history_segments:
            raise ProtocolError(Code.HISTORY_TOO_LONG, f"a restore carries at most {limits.max_history_segments} segments")
        turns = [segment_from_wire(self.state, item, allow_audio=False)[:2] for item in message.history]
        sessions = self.state.sessions
        for session in {s for s in (self.session, sessions.get(self.key_id, self.conversation_id)) if s is not None}:
            await self._forget(session)
        session = sessions.create(self.key_id, self.conversation_id, voices)
        for segment, origin in turns:
            await add_turn(session.conv, segment, origin)
        await self._take(session)
        await self._ready(message.id, "restored")

    async def close(self, message: Close) -> None:
        if self.generating:
            raise ProtocolError(Code.BUSY, "a reply is in progress; interrupt it before closing")
        session = self.session or self.state.sessions.get(self.key_id, self.conversation_id)
        if session is not None:
            await self._forget(session)
        self.session = None
        await self.send({"type": "closed", "re": message.id})
        await self.ws.close()

    async def add_segment(self, message: AddSegment) -> None:
        state = self.state
        item = SegmentIn.model_construct(speaker=message.speaker, text=message.text, codes=message.codes, audio=message.audio)
        segment, _, audio = segment_from_wire(state, item, allow_audio=True)
        await add_turn(self.session.conv, segment, "user", audio)
        await self.send({"type": "added", "re": message.id, "turns": len(self.session.turns())}, events=True)

    async def interrupt(self, message: Interrupt) -> None:
        conv = self.session.conv
        if self.generating:
            self.interrupted = True
            if self.queued:  # still waiting for a place: it never starts (its `done` follows)
                self._stopping, self._stop_reason = True, None
                self.speak_task.cancel()
            elif conv.speaking:
                await conv.interrupt(message.played_ms, replies=message.replies)
            else:  # the reply has not started: stop it at its first frame
                self.pending_interrupt = (message.played_ms, message.replies)
            await self.send({"type": "interrupted", "re": message.id, "speaking": True}, events=True)
            return
        await self.settle()  # a reply that just ended: its `done` goes out first
        await conv.interrupt(message.played_ms, replies=message.replies)
        await self.send({"type": "interrupted", "re": message.id, "speaking": False}, events=True)

    def speak(self, message: Speak) -> None:
        state = self.state
        if state.draining:
            raise ProtocolError(Code.DRAINING, "the server is shutting down; reconnect (another replica will take over)")
        check_text(state, message.text)
        check_style(state, message.options.style)  # refused now, not after waiting for a place
        self.generating = self.queued = True
        self.interrupted = self._stopping = False
        self.pending_interrupt = self._stop_reason = self._behind_since = None
        self.speak_task = asyncio.create_task(self._reply(message, self.session))

    # --- one reply -----------------------------------------------------------------------

    async def _reply(self, message: Speak, session: Session) -> None:
        """Wait for a place (admission.py), then generate and send; exactly one `done` unless the
        reply was refused before it started (an `error`) or the socket went away."""
        state = self.state
        queued_at = time.perf_counter()
        try:
            place = await state.admission.acquire(self.key_id)
        except asyncio.CancelledError:
            self.generating = self.queued = False
            if not self._stopping:
                raise
            asyncio.current_task().uncancel()  # interrupted (or superseded) while it waited
            await self._done(message.id, "interrupted", self._take_stop_reason(), 0)
            return
        except ProtocolError as e:  # busy (with a retry-after hint) or draining: refused, no `done`
            self.generating = self.queued = False
            await self.send_error(message.id, e.code, e.message, retry_after_s=getattr(e, "retry_after_s", None))
            return
        self.queued = False
        state.metrics.queue_wait.observe(time.perf_counter() - queued_at)
        state.stream_started(self.key_id)
        try:
            await self._generate(message, session, place)
        finally:
            state.admission.release(place)  # (released already when generation ended)

    def _take_stop_reason(self) -> ProtocolError | None:
        reason, self._stop_reason, self._stopping = self._stop_reason, None, False
        return reason

    async def _generate(self, message: Speak, session: Session, place) -> None:
        state, metrics, conv = self.state, self.state.metrics, session.conv
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        first = last = None
        frames = 0
        outcome, error = "completed", None
        pacing = _Pacing(state.limits.reader_lag_s)
        try:
            options = message.options
            stream = conv.speak(message.text, options, max_audio_ms=reply_ms(state, message.text, options.max_audio_ms))
            async with contextlib.aclosing(stream):
                pulled = loop.time()
                async for chunk in stream:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        metrics.time_to_first_audio.observe(now - start)
                    else:
                        metrics.frame_interval.observe((now - last) / max(1, chunk.num_frames))
                    last = now
                    ready = loop.time()
                    due = pacing.due(ready, ready - pulled > 0.001, chunk.num_frames * FRAME_MS / 1000)
                    frames += chunk.num_frames  # delivered: its header and PCM go out whatever happens next
                    await self.send_chunk(message.id, chunk, due, place)
                    if self.pending_interrupt is not None:
                        (played_ms, replies), self.pending_interrupt = self.pending_interrupt, None
                        await conv.interrupt(played_ms, replies=replies)
                    pulled = loop.time()
            if self.interrupted:
                outcome = "interrupted"
        except asyncio.CancelledError:
            if not self._stopping:  # the socket went away (or the task was cancelled from outside)
                outcome = "cancelled"
                raise
            asyncio.current_task().uncancel()  # stopped on purpose: the client still gets its `done`
            outcome, error = "interrupted", self._take_stop_reason()
        except SlowConsumer as e:
            outcome, error = "slow_consumer", e
            log.info("ended a reply after %d frames: %s", frames, e)
        except CSMError as e:
            outcome, error = "error", e
        except ConnectionError:  # the socket went away while sending
            outcome = "disconnected"
        except Exception as e:
            log.exception("a reply failed")
            outcome, error = "error", e
        finally:
            self.generating = False
            self._behind_since = None
            state.admission.release(place)  # now, not after the `done`, which may wait for a slow socket
            state.stream_ended(self.key_id)
            metrics.streams.labels(outcome).inc()
            if frames:
                seconds = frames * FRAME_MS / 1000
                metrics.audio_seconds.inc(seconds)
                metrics.real_time_factor.observe((time.perf_counter() - start) / seconds)
        if outcome in ("completed", "interrupted", "error", "slow_consumer"):
            await self._done(message.id, "error" if outcome == "slow_consumer" else outcome, error, frames)

    async def _done(self, rid, outcome: str, error: BaseException | None, frames: int) -> None:
        if error is not None:
            code = error_code(error)
            self.state.metrics.errors.labels(code).inc()
            error = {"code": code, "message": str(error) if code != Code.INTERNAL else "internal server error"}
        turns = len(self.session.turns()) if self.session is not None else 0
        payload = {"type": "done", "re": rid, "reason": outcome, "frames": frames, "turns": turns, "error": error}
        with contextlib.suppress(ConnectionError):
            await self.send(payload, events=True)

    # --- sending -------------------------------------------------------------------------

    async def send(self, payload: dict, events: bool = False) -> None:
        """Send a message; events: with the history's changes since the last such message, taken
        under the send lock so that the client applies them in the order they happened."""
        async with self._send_lock:
            if events:
                session = self.session
                payload["events"] = events_out(session.take_events()) if session is not None else []
            await self.ws.send_str(dumps(payload))

    async def send_error(self, rid: int | None, code: str, message: str, retry_after_s: float | None = None) -> None:
        self.state.metrics.errors.labels(code).inc()
        payload = {"type": "error", "re": rid, "code": code, "message": message}
        if retry_after_s is not None:
            payload["retry_after_s"] = retry_after_s
        with contextlib.suppress(ConnectionError):
            await self.send(payload)

    async def send_chunk(self, rid: int | None, chunk: AudioChunk, due: float, place) -> None:
        """The chunk's header, then its PCM, sent by a task of its own: stopping the reply while it
        waits for the socket never splits a header from its PCM, and a chunk once started counts
        as delivered (the `done` that follows waits for it under the send lock).

        Backpressure: this waits until the socket takes the chunk, so the reply is not pulled
        and its generation pauses. A socket that has not taken it by `due` (see _Pacing) means
        the reader is behind: the reply is out of the batch (the engine pauses a stream its
        listener does not drain) and, if another reply waits for a place, gives its place up at
        once (admission.py); the engine then suspends it, its cache slot going to the reply
        admitted in its stead, and resumes it where it was once its reader catches up. A reader
        that stays behind for send_timeout_s ends the reply with SlowConsumer."""
        pair = asyncio.ensure_future(self._send_pair(dumps(chunk_header(rid, chunk)), chunk.data))
        try:
            await self._wait_sent(pair, due, place)
        finally:  # if left behind, it finishes (or fails quietly when the socket goes)
            pair.add_done_callback(_quiet)

    async def _wait_sent(self, pair: asyncio.Future, due: float, place) -> None:
        loop = asyncio.get_running_loop()
        limit = self.state.limits.send_timeout_s
        while True:
            deadline = due if self._behind_since is None else self._behind_since + limit
            await asyncio.wait({pair}, timeout=max(0.0, deadline - loop.time()))
            if pair.done():
                pair.result()  # a ConnectionError if the socket went away
                if self._behind_since is not None and loop.time() <= due:  # caught up
                    self._behind_since = None
                    self.state.admission.set_behind(place, False)
                return
            if self._behind_since is None:
                self._behind_since = loop.time()
                self.state.admission.set_behind(place, True)  # gives the place up if a reply waits
            elif loop.time() >= deadline:
                raise SlowConsumer(f"the reader stayed behind real time for {limit:g} s")

    async def _send_pair(self, header: str, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_str(header)
            await self.ws.send_bytes(data)



def _quiet(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: a send that failed because the socket went away is no news
