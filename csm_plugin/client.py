"""A csm-plugin server seen through the same interface as the local service (backend.py).

    backend = await RemoteBackend("http://127.0.0.1:8000", api_key=os.environ["CSM_API_KEY"]).start()
    conv = backend.conversation("call-42")
    await conv.add_segment(1, "Hi, I have a question.", audio=pcm, sample_rate=16_000)
    async for chunk in conv.speak("Sure, go ahead."):   # csm_plugin.service.AudioChunk, int16 24 kHz
        play(chunk.data)
    await backend.close()

The client keeps each conversation's history itself, codes included, exactly as the server
reports it. Whenever a socket has to be opened again (network blip, server restart, failover to
another replica behind the load balancer), the client presents a digest of that history; a
server that does not have the same state answers `unknown_conversation` and the client replays
the history (codes, no re-encoding). A restart or failover costs one prefill, never a turn.

Retries: requests are retried on a new socket until `reconnect_timeout`; a reply is restarted if
the socket breaks before its first audio. A reply cut off after some audio raises
ConnectionLostError, and the history keeps what was heard, as the local service would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np

from .audio import as_mono, float_to_int16
from .conversation.history import Event, History, HistoryView, check_played_ms
from .conversation.options import SpeakOptions
from .conversation.protocol import (
    CONVERSATION_ID_RULE,
    Code,
    chunk_in,
    dumps,
    events_in,
    segment_in,
    segment_out,
    valid_conversation_id,
)
from .conversation.types import FRAME_MS, AudioChunk, Segment, check_name, check_speaker, check_text
from .errors import AudioError, ContextTooLongError, ConversationBusyError, CSMError, EngineError, InputError

log = logging.getLogger(__name__)

__all__ = [
    "RemoteBackend",
    "RemoteConversation",
    "RemoteError",
    "AuthenticationError",
    "ServerUnavailableError",
    "ConnectionLostError",
    "LimitExceededError",
    "SlowConsumerError",
]


# --- errors ------------------------------------------------------------------------------------

class RemoteError(CSMError):
    """An error reported by (or about) the server; `code` is the protocol's error code."""

    def __init__(self, message: str, code: str = Code.INTERNAL):
        super().__init__(message)
        self.code = code


class AuthenticationError(RemoteError):
    """The server refused the API key (HTTP 401)."""


class ServerUnavailableError(RemoteError):
    """No server answered within reconnect_timeout (or ready_timeout at start)."""


class ConnectionLostError(RemoteError):
    """The socket broke while a reply's audio was flowing; the history keeps what was delivered."""


class LimitExceededError(RemoteError):
    """A server limit: too many conversations or replies for this key, or a message too big."""


class SlowConsumerError(RemoteError):
    """The reply ended because its audio was not read fast enough (the reader stayed behind real
    time); the history keeps the frames that were sent."""


class UnknownConversationError(RemoteError):
    """The server does not have this conversation's current state (handled by replaying it)."""


class RemoteInputError(RemoteError, InputError):
    pass


class RemoteAudioError(RemoteError, AudioError):
    pass


class RemoteContextTooLongError(RemoteError, ContextTooLongError):
    pass


class RemoteBusyError(RemoteError, ConversationBusyError):
    pass


class RemoteEngineError(RemoteError, EngineError):
    pass


_ERRORS: dict[str, type[RemoteError]] = {
    Code.UNAUTHORIZED: AuthenticationError,
    Code.TOO_MANY_AUTH_FAILURES: AuthenticationError,
    Code.BAD_MESSAGE: RemoteInputError,
    Code.INVALID_INPUT: RemoteInputError,
    Code.TEXT_TOO_LONG: RemoteInputError,
    Code.UNKNOWN_VOICE: RemoteInputError,
    Code.UNKNOWN_STYLE: RemoteInputError,
    Code.INVALID_AUDIO: RemoteAudioError,
    Code.AUDIO_TOO_LONG: RemoteAudioError,
    Code.CONTEXT_TOO_LONG: RemoteContextTooLongError,
    Code.HISTORY_TOO_LONG: RemoteContextTooLongError,
    Code.BUSY: RemoteBusyError,
    Code.ENGINE_ERROR: RemoteEngineError,
    Code.INTERNAL: RemoteEngineError,
    Code.MESSAGE_TOO_BIG: LimitExceededError,
    Code.TOO_MANY_CONVERSATIONS: LimitExceededError,
    Code.TOO_MANY_STREAMS: LimitExceededError,
    Code.UNKNOWN_CONVERSATION: UnknownConversationError,
    Code.SLOW_CONSUMER: SlowConsumerError,
    Code.TOO_MANY_CONNECTIONS: ServerUnavailableError,
    Code.DRAINING: ServerUnavailableError,
    Code.NOT_READY: ServerUnavailableError,
    Code.SUPERSEDED: ServerUnavailableError,
}
# Worth another socket: the next one may reach another (or a recovered) replica.
_RETRY_CODES = {Code.DRAINING, Code.NOT_READY, Code.TOO_MANY_CONNECTIONS, Code.SUPERSEDED}


def remote_error(code: str, message: str, retry_after_s: float | None = None) -> RemoteError:
    """The client-side error for a server error code. A `busy` with a retry-after hint (the
    server's queue is full) is a ServerUnavailableError that says when to try again; `busy`
    without one is the conversation's own reply in progress (ConversationBusyError)."""
    if code == Code.BUSY and retry_after_s is not None:
        error: RemoteError = ServerUnavailableError(message, code)
    else:
        error = _ERRORS.get(code, RemoteError)(message, code)
    error.retry_after_s = retry_after_s
    return error


def _server_busy(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.code == Code.BUSY and getattr(error, "retry_after_s", None) is not None


class _Retry(Exception):
    """Internal: this attempt failed in a way another socket may fix."""


_NETWORK_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


# --- backend -----------------------------------------------------------------------------------

class RemoteBackend:
    """SpeechBackend over a csm-plugin server (or a load balancer in front of several).

    url: http(s)://host:port[/prefix]. api_key: defaults to $CSM_API_KEY. Options:
    connect_timeout, request_timeout (one request, e.g. encoding a long segment, or a reply's first
    audio, which may wait in the server's queue), read_timeout (the longest silence between two
    messages of a reply, and of any HTTP read: then the socket is dropped and the reply restarted
    if nothing was heard, else ConnectionLostError), reconnect_timeout (how long a request keeps
    trying new sockets, or waiting out a busy server), ready_timeout (start() waits for a ready
    server), heartbeat (WebSocket ping interval), retry_initial / retry_max (backoff, seconds),
    ssl (for https:// and wss://: an ssl.SSLContext that trusts a private CA, say; default: the
    system's trust store)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 10.0,
        request_timeout: float = 120.0,
        read_timeout: float = 30.0,
        reconnect_timeout: float = 30.0,
        ready_timeout: float = 60.0,
        heartbeat: float = 20.0,
        retry_initial: float = 0.05,
        retry_max: float = 2.0,
        ssl: Any = True,
    ):
        url = url.rstrip("/")
        for ws, http in (("ws://", "http://"), ("wss://", "https://")):
            if url.startswith(ws):
                url = http + url[len(ws):]
        if not url.startswith(("http://", "https://")):
            raise InputError(f"the server url must start with http://, https://, ws:// or wss://, got {url!r}")
        self.url = url
        self.api_key = api_key if api_key is not None else os.environ.get("CSM_API_KEY")
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.read_timeout = read_timeout
        self.reconnect_timeout = reconnect_timeout
        self.ready_timeout = ready_timeout
        self.heartbeat = heartbeat
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.ssl = ssl
        self.info: dict[str, Any] = {}
        self._http: aiohttp.ClientSession | None = None
        self._conversations: dict[str, RemoteConversation] = {}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def start(self) -> RemoteBackend:
        """Open the HTTP session and wait (up to ready_timeout) for a ready server that takes the key."""
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl),
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.read_timeout),
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        delay, last = self.retry_initial, None
        while True:
            try:
                async with self._http.get(self.url + "/v1/info", headers=self.headers) as response:
                    if response.status == 200:
                        self.info = await response.json()
                        return self
                    last = await _error_from_response(response)
            except _NETWORK_ERRORS as e:
                last = e
            if isinstance(last, AuthenticationError) or loop.time() + delay > deadline:
                await self.close()
                if isinstance(last, AuthenticationError):
                    raise last
                raise ServerUnavailableError(f"no ready server at {self.url} within {self.ready_timeout:g} s: {last}", Code.NOT_READY)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max)

    def conversation(self, conversation_id: str, *, voices: Mapping[int, str] | None = None) -> RemoteConversation:
        """The conversation with this id (one handle per id, as with the local service). `voices`
        maps speakers to voice names registered on the server."""
        if conversation_id in self._conversations:
            return self._conversations[conversation_id]
        if not valid_conversation_id(conversation_id):
            raise InputError(CONVERSATION_ID_RULE)
        for speaker in voices or {}:
            check_speaker(speaker)
        conv = self._conversations[conversation_id] = RemoteConversation(self, conversation_id, dict(voices or {}))
        return conv

    async def speech(
        self, text: str, options: SpeakOptions | None = None, *, context: list[Segment] | None = None,
        voice: str | None = None, **changes
    ) -> bytes:
        """One reply as a WAV file (POST /v1/speech), after an optional context of segments.
        `voice`: a voice registered on the server (its /v1/info lists them), pinned for the
        reply's speaker; `style=` (a SpeakOptions field) names one of its styles."""
        options = SpeakOptions.build(options, **changes)
        body = {"text": check_text(text), **options.to_wire(), "context": [segment_out(s, "user") for s in context or []]}
        if voice is not None:
            body["voice"] = check_name(voice, "voice")
        retry = _Backoff(self)
        while True:
            async with self._session().post(
                self.url + "/v1/speech", headers=self.headers, json=body, timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            ) as response:
                if response.status == 200:
                    return await response.read()
                error = await _error_from_response(response)
            if not _server_busy(error):
                raise error
            await retry.wait(error, at_least=error.retry_after_s)  # the server's queue is full: back off

    async def close(self) -> None:
        """Close every stream (the server keeps the conversations for a while) and the session."""
        for conv in list(self._conversations.values()):
            await conv._drop()
        self._conversations.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> RemoteBackend:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise CSMError("the backend is not started: `await backend.start()` first")
        return self._http


async def _error_from_response(response: aiohttp.ClientResponse) -> RemoteError:
    try:
        error = (await response.json(content_type=None))["error"]
        return remote_error(error["code"], error["message"], error.get("retry_after_s"))
    except Exception:  # noqa: BLE001 - not our JSON error body (a proxy's page, say)
        code = {401: Code.UNAUTHORIZED, 413: Code.MESSAGE_TOO_BIG, 429: Code.TOO_MANY_STREAMS}.get(response.status, Code.NOT_READY)
        return remote_error(code, f"HTTP {response.status} {response.reason}")


# --- conversation ------------------------------------------------------------------------------

@dataclass
class _Stream:
    """One reply: its request id, what was delivered to the caller, how it ended."""

    rid: int
    text: str
    speaker: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    delivered_frames: int = 0
    codes: list[np.ndarray] = field(default_factory=list)
    heard: tuple[float, int] | None = None  # an explicit interrupt(played_ms, replies) from the caller
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # `done` applied, or given up
    ended: bool = False  # the caller read it to its end (done, error or lost)
    correction: asyncio.Future | None = None  # the interrupt sent when the caller stopped early


class RemoteConversation(HistoryView):
    """ConversationHandle over one WebSocket (opened lazily, reopened when needed)."""

    def __init__(self, backend: RemoteBackend, conversation_id: str, voices: dict[int, str]):
        self.backend = backend
        self.id = conversation_id
        self.voices = voices
        self.replays = 0  # how many times the history was replayed to a server (observability)
        self._history = History()  # as the server recorded it: its events are applied here
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._ids = iter(range(1, 2**62))
        self._lock = asyncio.Lock()
        self._stream: _Stream | None = None
        self._unsettled: _Stream | None = None  # a reply the caller stopped early, not yet reconciled
        self._speaking = False
        self._background: set[asyncio.Task] = set()

    # --- ConversationHandle ---------------------------------------------------------------

    def digest(self) -> str:
        """The fingerprint the server compares on reconnect (see History.digest)."""
        return self._history.digest(self.voices)

    @property
    def speaking(self) -> bool:
        return self._speaking

    async def add_segment(
        self, speaker: int, text: str, audio: np.ndarray | None = None, sample_rate: int | None = None
    ) -> list[Event]:
        """Record a turn; audio (mono, any rate) is encoded on the server, which sends the codes back."""
        check_speaker(speaker)
        text = check_text(text)
        self._check_idle()
        message: dict[str, Any] = {"type": "add_segment", "speaker": speaker, "text": text}
        if audio is not None:
            if sample_rate is None or isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
                raise AudioError(f"audio needs an int sample_rate, got {sample_rate!r}")
            try:
                pcm = as_mono(audio)
            except AudioError:
                raise
            except (TypeError, ValueError) as e:  # e.g. a list of strings, a ragged list
                raise AudioError(f"audio must be an array of samples: {e}") from None
            message["audio"] = {"format": "s16le", "sample_rate": int(sample_rate), "data": _b64(float_to_int16(pcm).astype("<i2"))}
        return events_in((await self._request(message)).get("events", []))

    async def speak(self, text: str, options: SpeakOptions | None = None, **changes) -> AsyncIterator[AudioChunk]:
        """Audio chunks of the reply as the server sends them (options as for the local service).
        Stopping early (break, aclose(), cancellation) keeps only the delivered frames in the
        history, as the local service does."""
        text = check_text(text)
        options = SpeakOptions.build(options, **changes).with_seed()  # fixed here: a restart says the same
        self._check_idle()
        self._speaking = True
        speaker = options.speaker
        message = {"type": "speak", "text": text, **options.to_wire()}
        retry = _Backoff(self.backend)
        stream: _Stream | None = None
        try:
            while True:
                try:
                    async with self._lock:
                        await self._ready_socket()
                        stream = self._stream = _Stream(next(self._ids), text, speaker)
                        await self._send({**message, "id": stream.rid})
                except _Retry as e:
                    await retry.wait(e)
                    continue
                restart = None
                while restart is None:
                    wait = self.backend.read_timeout if stream.delivered_frames else self.backend.request_timeout
                    try:
                        kind, *item = await asyncio.wait_for(stream.queue.get(), wait)
                    except asyncio.TimeoutError:  # a server that went silent: this socket is done for
                        kind, item = "lost", [f"no message from the server within {wait:g} s"]
                        await self._drop()
                    if kind == "chunk":
                        (chunk,) = item
                        stream.delivered_frames += chunk.num_frames
                        if chunk.codes is not None:
                            stream.codes.extend(chunk.codes)
                        yield chunk
                    elif kind == "done":
                        stream.ended = True
                        error = item[0].get("error")
                        if error and error["code"] in (Code.DRAINING, Code.SUPERSEDED):
                            # cut by the server's shutdown or by another socket: the history keeps
                            # what was sent (the done's events), the rest of the reply is lost
                            raise ConnectionLostError(f"the reply was cut: {error['message']}", error["code"])
                        if error:
                            raise remote_error(error["code"], error["message"])
                        return
                    elif kind == "error":  # refused before it started
                        error = item[0]
                        stream.finished.set()
                        stream.ended = True
                        if _server_busy(error):  # no place on the server now: ask again after its hint
                            restart = error
                            continue
                        if error.code not in _RETRY_CODES:
                            raise error
                        restart = error
                        await self._drop()
                    elif kind == "lost":
                        stream.finished.set()
                        stream.ended = True
                        if stream.delivered_frames:
                            self._record_partial(stream)
                            raise ConnectionLostError(f"the connection broke during the reply: {item[0]}", Code.INTERNAL)
                        restart = item[0]  # nothing was heard: say it again on a new socket
                await retry.wait(restart, at_least=getattr(restart, "retry_after_s", None) or 0.0)
        finally:
            self._speaking = False
            if stream is not None and not stream.ended:
                self._stopped_early(stream)

    async def interrupt(self, played_ms: float | None = None, *, replies: int = 1) -> list[Event]:
        """The listener talked over the reply: stop it. played_ms (audio actually played) trims the
        recorded reply; after a reply has ended, trims that last reply instead; replies=n trims
        the last n replies, played back to back (see the local service)."""
        if played_ms is not None:
            played_ms = check_played_ms(played_ms)
        if isinstance(replies, bool) or not isinstance(replies, int) or replies < 1:
            raise InputError(f"replies must be an int >= 1, got {replies!r}")
        stream = self._stream
        if self._speaking and stream is not None and not stream.finished.is_set():
            if played_ms is not None:
                stream.heard = (played_ms, replies)
            with contextlib.suppress(_Retry):
                await self._send({"type": "interrupt", "id": next(self._ids), "played_ms": played_ms, "replies": replies})
            return []
        if played_ms is None or not self._history.turns:
            return []  # nothing to trim: no round trip
        answer = await self._request({"type": "interrupt", "played_ms": played_ms, "replies": replies})
        return events_in(answer.get("events", []))

    async def close(self) -> None:
        """Forget this conversation on the server, then close the socket."""
        self._check_idle()
        self.backend._conversations.pop(self.id, None)
        try:
            async with self._lock:
                await self._settle()
                if self._ws is None:
                    await self._open_socket()
                await self._roundtrip({"type": "close"})
        except (RemoteError, _Retry) as e:
            log.debug("closing %s on the server: %s", self.id, e)  # it forgets idle conversations anyway
        finally:
            await self._drop()
            self._history = History()

    # --- requests and sockets -------------------------------------------------------------

    def _check_idle(self) -> None:
        if self._speaking:
            raise ConversationBusyError(f"conversation {self.id!r} is speaking; wait for the reply to end or interrupt() it first")

    async def _request(self, message: dict) -> dict:
        """Send a request on a socket whose conversation matches ours; retry on new sockets."""
        retry = _Backoff(self.backend)
        while True:
            try:
                async with self._lock:
                    await self._ready_socket()
                    return await self._roundtrip(message)
            except _Retry as e:
                await retry.wait(e)

    async def _ready_socket(self) -> None:
        """Reconcile an early-stopped reply, then make sure a socket is open with our history on it."""
        await self._settle()
        if self._ws is not None and not self._ws.closed:
            return
        await self._drop()
        await self._open_socket()
        turns = self._history.turns
        open_message = {"type": "open", "voices": _voices_json(self.voices), "turns": len(turns),
                        "digest": self.digest()}
        try:
            ready = await self._roundtrip(open_message)
        except UnknownConversationError:
            history = [segment_out(t.segment, t.origin) for t in turns]
            ready = await self._roundtrip({"type": "restore", "voices": _voices_json(self.voices), "history": history})
            self.replays += 1
            log.info("conversation %s: replayed %d turns to the server", self.id, len(history))
        self._history.replace([segment_in(v)[0] for v in ready["voices"]], [(t.segment, t.origin) for t in turns])

    async def _open_socket(self) -> None:
        backend = self.backend
        url = f"{backend.url}/v1/conversations/{quote(self.id, safe='')}/stream"
        try:
            ws = await backend._session().ws_connect(
                url, headers=backend.headers, heartbeat=backend.heartbeat, max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as e:
            if e.status == 401:
                raise AuthenticationError("the server refused the API key", Code.UNAUTHORIZED) from e
            if e.status in (400, 413, 429):
                code = {400: Code.BAD_MESSAGE, 413: Code.MESSAGE_TOO_BIG, 429: Code.TOO_MANY_CONVERSATIONS}[e.status]
                raise remote_error(code, f"the server refused the stream: HTTP {e.status} {e.message}") from e
            raise _Retry(f"HTTP {e.status} {e.message}") from e
        except _NETWORK_ERRORS as e:
            raise _Retry(f"cannot connect to {backend.url}: {e!r}") from e
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws), name=f"csm-client-{self.id}")

    async def _send(self, message: dict) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise _Retry("the socket is closed")
        try:
            await ws.send_str(dumps(message))
        except _NETWORK_ERRORS as e:
            raise _Retry(f"sending failed: {e!r}") from e

    async def _roundtrip(self, message: dict) -> dict:
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._futures[rid] = future
        try:
            await self._send({**message, "id": rid})
            return await asyncio.wait_for(future, self.backend.request_timeout)
        except asyncio.TimeoutError:
            await self._drop()
            raise _Retry(f"no answer to {message['type']!r} within {self.backend.request_timeout:g} s") from None
        except RemoteError as e:
            if e.code in _RETRY_CODES:
                await self._drop()
                raise _Retry(str(e)) from e
            raise
        finally:
            self._futures.pop(rid, None)

    async def _drop(self) -> None:
        """Close the socket (the server keeps the conversation) and wait for the reader to finish."""
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5.0)
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            self._on_disconnect(ws)

    # --- the reader: every server message, in order ---------------------------------------

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        header = None
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == "chunk":
                        header = data
                    else:
                        self._on_message(data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    stream = self._stream
                    if header is not None and stream is not None and header.get("re") == stream.rid and not stream.finished.is_set():
                        stream.queue.put_nowait(("chunk", chunk_in(header, msg.data)))
                    header = None
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken message breaks this socket only
            log.exception("conversation %s: bad message from the server", self.id)
        finally:
            if self._ws is ws:
                self._ws = None
                self._on_disconnect(ws)

    def _on_message(self, data: dict) -> None:
        kind, rid = data.get("type"), data.get("re")
        stream = self._stream if self._stream is not None and self._stream.rid == rid else None
        if kind == "error":
            error = remote_error(data.get("code", Code.INTERNAL), data.get("message", ""), data.get("retry_after_s"))
            future = self._futures.get(rid)
            if future is not None and not future.done():
                future.set_exception(error)
            elif stream is not None and not stream.finished.is_set():
                stream.queue.put_nowait(("error", error))
            else:
                log.warning("conversation %s: server error %s: %s", self.id, error.code, error)
            return
        for event in events_in(data.get("events", [])):  # the server's history changed: ours too
            self._history.apply(event)
        if kind == "done" and stream is not None:
            stream.finished.set()
            stream.queue.put_nowait(("done", data))
        future = self._futures.get(rid)
        if future is not None and not future.done():
            future.set_result(data)

    def _on_disconnect(self, ws) -> None:
        reason = f"socket closed (code {getattr(ws, 'close_code', None)})"
        if ws is not None and ws.close_code == 1009:
            error: Exception = LimitExceededError("a message was over the server's size limit", Code.MESSAGE_TOO_BIG)
        else:
            error = _Retry(reason)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        stream = self._stream
        if stream is not None and not stream.finished.is_set():
            if self._speaking:
                stream.queue.put_nowait(("lost", reason))
            else:  # stopped early by the caller and never reconciled: keep what was delivered
                stream.finished.set()
                self._record_partial(stream)
        if self._unsettled is not None and self._unsettled.correction is not None and not self._unsettled.correction.done():
            self._unsettled.correction.set_exception(error)

    # --- keeping the history exact --------------------------------------------------------

    def _stopped_early(self, stream: _Stream) -> None:
        """The caller stopped reading: tell the server how much was heard (what was delivered, or
        what the caller said was played), so both histories keep exactly that; the next request
        waits for the answer (see _settle)."""
        if stream.heard is None:
            stream.heard = (stream.delivered_frames * FRAME_MS, 1)
        self._unsettled = stream
        if self._ws is None or self._ws.closed:
            self._unsettled = None
            self._reconcile_locally(stream)
            return
        rid = next(self._ids)
        stream.correction = self._futures[rid] = asyncio.get_running_loop().create_future()
        played_ms, replies = stream.heard
        message = {"type": "interrupt", "id": rid, "played_ms": played_ms, "replies": replies}
        task = asyncio.get_running_loop().create_task(self._send_quietly(message))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, message: dict) -> None:
        with contextlib.suppress(_Retry):
            await self._send(message)

    async def _settle(self, timeout: float = 10.0) -> None:
        """Wait for the server's account of an early-stopped reply (its `done`, then the answer to
        the trimming interrupt). If it does not come, drop the socket: our own record stands and
        the next open finds out whether the server agrees."""
        stream, self._unsettled = self._unsettled, None
        if stream is None:
            return
        waits = [stream.finished.wait()] + ([stream.correction] if stream.correction is not None else [])
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except Exception:  # noqa: BLE001 - timeout or a lost socket: reconcile locally
            await self._drop()
            self._reconcile_locally(stream)
        finally:
            self._futures = {k: v for k, v in self._futures.items() if v is not stream.correction}

    def _reconcile_locally(self, stream: _Stream) -> None:
        """Without the server's account: if its `done` came, apply the caller's barge-in to the
        reply it recorded; if not, record the reply as the caller heard it. The same History
        rules as on the server."""
        played_ms, replies = stream.heard if stream.heard is not None else (None, 1)
        if stream.finished.is_set():
            if played_ms is not None:
                self._history.trim_heard(played_ms, replies)
            return
        stream.finished.set()
        self._record_partial(stream)

    def _record_partial(self, stream: _Stream) -> None:
        """The reply broke off without the server's account: record what the caller got."""
        played_ms, replies = stream.heard if stream.heard is not None else (None, 1)
        self._history.record_heard(
            stream.speaker, stream.text, stream.codes[: stream.delivered_frames], complete=False,
            played_ms=played_ms, replies=replies,
        )


class _Backoff:
    """Exponential backoff until the backend's reconnect_timeout, then ServerUnavailableError."""

    def __init__(self, backend: RemoteBackend):
        self.backend = backend
        self.delay = backend.retry_initial
        self.deadline = asyncio.get_running_loop().time() + backend.reconnect_timeout

    async def wait(self, reason: object, at_least: float = 0.0) -> None:
        """Sleep before the next try; at_least: the server's retry-after hint (a busy server),
        spread by up to 20% so that many clients do not come back at the same moment."""
        loop = asyncio.get_running_loop()
        delay = max(self.delay, at_least * random.uniform(1.0, 1.2)) if at_least else self.delay
        if loop.time() + delay > self.deadline:
            busy = _server_busy(reason)
            raise ServerUnavailableError(
                f"{'the server stayed busy' if busy else 'no server took the conversation'} within "
                f"{self.backend.reconnect_timeout:g} s: {reason}", Code.BUSY if busy else Code.NOT_READY
            ) from (reason if isinstance(reason, BaseException) else None)
        log.debug("retrying in %.2f s: %s", delay, reason)
        await asyncio.sleep(delay)
        self.delay = min(self.delay * 2, self.backend.retry_max)


def _voices_json(voices: Mapping[int, str]) -> dict[str, str]:
    return {str(k): v for k, v in voices.items()}


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode("ascii")
