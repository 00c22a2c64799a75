"""Sesame CSM as a LiveKit Agents TTS that follows the conversation.

CSM conditions every reply on the conversation so far (who said what, and how it sounded). This
TTS keeps one csm-plugin conversation per instance and feeds it from the AgentSession: user turns
(transcript, plus the user's audio when the session's audio input is available) are recorded as
soon as they are committed, the agent's own replies are recorded by the model as it speaks them,
and a barge-in trims the reply to what the listener heard.

Nothing heavy happens at import: csm_plugin (and torch) are imported, and the weights loaded, on
first use or in `prewarm()`, once per process (the process-wide `shared_service`).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    get_job_context,
    tokenize,
    tts,
    utils,
)
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from livekit.agents.utils import is_given
from livekit.agents.voice import io

from csm_plugin.conversation.options import SpeakOptions  # torch-free

from .log import logger
from .models import NUM_CHANNELS, SAMPLE_RATE, DTypes, TTSModels, VoicePrompt

if TYPE_CHECKING:
    from csm_plugin.backend import ConversationHandle, SpeechBackend
    from livekit.agents import AgentSession

FRAME_MS = 80  # one CSM frame
_USER_AUDIO_MARGIN_S = 0.25  # around the session's speech start/stop times
_USER_AUDIO_KEEP_S = 120.0


@dataclass
class _TTSOptions:
    speak: SpeakOptions  # how each sentence is spoken (its speaker is the agent)
    user_speaker: int

    @property
    def speaker(self) -> int:
        return self.speak.speaker


@dataclass
class _Speech:
    """What one stream spoke: frames kept per sentence (each one history segment), in order."""

    frames: list[int] = field(default_factory=list)
    frames_pushed: int = 0
    history_len: int = -1  # len(conversation.history) right after it; -1 while it runs


class TTS(tts.TTS):
    def __init__(
        self,
        *,
        model: TTSModels | str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        device: str = "cpu",
        dtype: DTypes | str = "float32",
        speaker: int = 0,
        user_speaker: int = 1,
        temperature: float = 0.9,
        top_k: int = 50,
        seed: int | None = None,
        max_audio_ms: float | None = None,
        voice: VoicePrompt | None = None,
        conversation_id: str | None = None,
        follow_session: bool = True,
        user_audio: bool = True,
        sentence_tokenizer: NotGivenOr[tokenize.SentenceTokenizer] = NOT_GIVEN,
        service_options: dict[str, Any] | None = None,
        backend: SpeechBackend | None = None,
    ) -> None:
        """Sesame CSM speech that follows the conversation.

        Args:
            model: checkpoint (hub id or local directory); default $CSM_MODEL, else sesame/csm-1b.
            url: a csm-plugin server (ws:// or http://) to use instead of loading the model here.
            api_key: the server's API key, if it needs one.
            device, dtype: where and how the in-process model runs ("cuda", "bfloat16", ...).
            speaker / user_speaker: CSM speaker ids of the agent and of the user.
            temperature, top_k, seed: sampling; a fixed seed makes replies reproducible.
            max_audio_ms: cap on each sentence's audio (default: from the text's length).
            voice: reference clip + transcript that fixes the agent's voice.
            conversation_id: id of the model-side conversation (default: a fresh one).
            follow_session: attach to the job's AgentSession automatically.
            user_audio: condition on the user's recorded voice, not only their words.
            sentence_tokenizer: how streamed LLM text is cut into sentences.
            service_options: extra `CSMService` options for the in-process model.
            backend: an already started SpeechBackend to use (overrides model/url).
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True),
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
        )
        if url and backend is not None:
            raise ValueError("pass either url= or backend=, not both")
        if speaker == user_speaker:
            raise ValueError("speaker and user_speaker must differ")
        self._model_name = model
        self._url = url
        self._api_key = api_key
        self._device = device
        self._dtype = dtype
        self._service_options = dict(service_options or {})
        self._opts = _TTSOptions(SpeakOptions(speaker, temperature, top_k, seed, max_audio_ms, chunk_frames=1), user_speaker)
        self._voice = voice
        self._conversation_id = conversation_id or utils.shortuuid("csm_")
        self._follow_session = follow_session
        self._user_audio = user_audio
        self._sentence_tokenizer = (
            sentence_tokenizer
            if is_given(sentence_tokenizer)
            else tokenize.blingfire.SentenceTokenizer(retain_format=True)
        )
        self._backend: SpeechBackend | None = backend
        self._owns_backend = False
        self._backend_task: asyncio.Task | None = None
        self._conv: ConversationHandle | None = None
        self._lock: asyncio.Lock | None = None
        self._session: AgentSession | None = None
        self._audio_out: io.AudioOutput | None = None
        self._tap: _UserAudioTap | None = None
        self._seen_items: set[str] = set()
        self._spoken = False
        self._unsettled: deque[_Speech] = deque(maxlen=8)  # replies whose playback has not ended
        self._pending_trims: list[tuple[_Speech, float]] = []
        self._tasks: set[asyncio.Task] = set()
        self._speaking: set[asyncio.Task] = set()  # the tasks of streams speaking now (see aclose)

    # --- LiveKit surface ----------------------------------------------------------------------

    @property
    def model(self) -> str:
        if self._url:
            return "csm-remote"
        return str(self._model_name or os.environ.get("CSM_MODEL", "sesame/csm-1b"))

    @property
    def provider(self) -> str:
        return "csm-plugin"

    @property
    def conversation_id(self) -> str:
        return self._conversation_id

    @property
    def conversation(self) -> ConversationHandle | None:
        """The model-side conversation (its `history` is what the next reply is conditioned on);
        None until the first use."""
        return self._conv

    def update_options(
        self,
        *,
        speaker: NotGivenOr[int] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        top_k: NotGivenOr[int] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        max_audio_ms: NotGivenOr[float | None] = NOT_GIVEN,
    ) -> None:
        changes = dict(speaker=speaker, temperature=temperature, top_k=top_k, seed=seed, max_audio_ms=max_audio_ms)
        given = {name: value for name, value in changes.items() if is_given(value)}
        if given.get("speaker", self._opts.speaker) == self._opts.user_speaker:
            raise ValueError("speaker and user_speaker must differ")
        self._opts.speak = SpeakOptions.build(self._opts.speak, **given)

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        self._auto_attach()
        return ChunkedStream(tts=self, input_text=text, conn_options=conn_options, options=self._opts.speak)

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        self._auto_attach()
        return SynthesizeStream(tts=self, conn_options=conn_options, options=self._opts.speak)

    def prewarm(self) -> None:
        """Load the model. Inside a running event loop (LiveKit calls this when the agent starts)
        loading starts in the background; without one (an AgentServer `setup_fnc`) it blocks until
        the model is loaded, so the job starts warm. Either way it loads once per process."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._backend is None and not self._url:
                self._backend = asyncio.run(self._open_backend())
            return
        self._auto_attach()
        self._backend_future()

    async def aclose(self) -> None:
        self._detach()
        # Streams still speaking stop now (each records what it delivered), then the
        # conversation is closed, so its cache slot is free for other calls.
        speaking = [t for t in self._speaking if not t.done()]
        for task in speaking:
            task.cancel()
        if speaking:
            await asyncio.wait(speaking)
        if self._backend_task is not None and not self._backend_task.done():
            if self._url:
                await utils.aio.cancel_and_wait(self._backend_task)  # a connection attempt: ours alone
            else:
                # let a load in progress finish: cancelling it could cancel the shared model's load
                await asyncio.wait([self._backend_task])
        for task in list(self._tasks):
            task.cancel()
        conv, self._conv = self._conv, None
        if conv is not None:
            try:
                await conv.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                logger.debug("closing conversation %s: %s", self._conversation_id, e)
        if self._owns_backend and self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()

    # --- following the session ----------------------------------------------------------------

    def attach(self, session: AgentSession) -> None:
        """Follow this session's conversation. Automatic for the job's primary session; call it
        yourself for a session outside a job (tests) or a second session in the same job."""
        if session is self._session:
            return
        self._detach()
        self._session = session
        session.on("conversation_item_added", self._on_item_added)
        session.on("agent_state_changed", self._on_state_changed)
        self._refresh_io()

    def _detach(self) -> None:
        if self._session is not None:
            self._session.off("conversation_item_added", self._on_item_added)
            self._session.off("agent_state_changed", self._on_state_changed)
            self._session = None
        if self._audio_out is not None:
            self._audio_out.off("playback_finished", self._on_playback_finished)
            self._audio_out = None

    def _auto_attach(self) -> None:
        if not self._follow_session or self._session is not None:
            return
        job = get_job_context(required=False)
        if job is None:
            return
        try:
            self.attach(job.primary_session)
        except RuntimeError:  # no session started in this job (yet)
            pass

    def _refresh_io(self) -> None:
        """Watch the session's current audio output (for what was played) and tap its audio input
        (for the user's voice); either can be set or replaced after attach()."""
        session = self._session
        if session is None:
            return
        out = session.output.audio
        if out is not self._audio_out:
            if self._audio_out is not None:
                self._audio_out.off("playback_finished", self._on_playback_finished)
            self._audio_out = out
            if out is not None:
                out.on("playback_finished", self._on_playback_finished)
        source = session.input.audio
        if self._user_audio and source is not None and source is not self._tap:
            self._tap = _UserAudioTap(source)
            session.input.audio = self._tap

    def _on_state_changed(self, _ev: Any) -> None:
        self._refresh_io()

    def _on_item_added(self, ev: Any) -> None:
        if getattr(ev.item, "role", None) == "user":
            self._schedule_catch_up()  # prefill the user's turn while the LLM thinks

    def _on_playback_finished(self, ev: io.PlaybackFinishedEvent) -> None:
        # the oldest reply still playing; an event for audio that is not ours finds none
        speech = next((s for s in self._unsettled if s.frames_pushed), None)
        if speech is None:
            return
        self._unsettled.remove(speech)
        if ev.interrupted:
            self._pending_trims.append((speech, float(ev.playback_position)))
            self._schedule_catch_up()

    def _schedule_catch_up(self) -> None:
        if self._conv is None:
            return  # nothing spoken yet; the first reply catches up

        async def run() -> None:
            async with self._get_lock():
                if self._conv is not None:
                    await self._catch_up(self._conv)

        task = asyncio.get_running_loop().create_task(run(), name="csm.catch_up")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _catch_up(self, conv: ConversationHandle) -> None:
        """Under the lock: trim interrupted replies to what was played, then record the session's
        new turns, in the order they happened."""
        while self._pending_trims:
            speech, played_s = self._pending_trims.pop(0)
            try:
                await self._trim(conv, speech, played_s * 1000)
            except Exception as e:  # noqa: BLE001 - a failed trim must not stop the next reply
                logger.warning("could not trim the interrupted reply: %s", e)
        for speaker, text, audio, rate in self._new_session_turns():
            try:
                await conv.add_segment(speaker, text, audio=audio, sample_rate=rate)
            except Exception as e:  # noqa: BLE001
                if audio is None:
                    logger.warning("could not record a conversation turn: %s", e)
                    continue
                logger.debug("user audio not usable (%s); recording the transcript only", e)
                await conv.add_segment(speaker, text)

    async def _trim(self, conv: ConversationHandle, speech: _Speech, played_ms: float) -> None:
        if len(conv.history) != speech.history_len or not speech.frames:
            return  # something was recorded after it: the reply is no longer the last segment
        # Its sentences are the last history segments, played back to back: the history trims
        # them newest first, each to what started playing.
        await conv.interrupt(played_ms, replies=len(speech.frames))

    def _new_session_turns(self) -> list[tuple[int, str, np.ndarray | None, int | None]]:
        session = self._session
        if session is None:
            return []
        turns = []
        for item in session.history.items:
            if getattr(item, "type", None) != "message" or item.id in self._seen_items:
                continue
            self._seen_items.add(item.id)
            text = (item.text_content or "").strip()
            if not text:
                continue
            if item.role == "user":
                audio, rate = self._tap.take(item.metrics) if self._tap is not None else (None, None)
                turns.append((self._opts.user_speaker, text, audio, rate))
            elif item.role == "assistant" and not self._spoken:
                # replies from before this TTS spoke (a restored history): their words only.
                # Later replies are this TTS's own speech, recorded by the model as heard.
                turns.append((self._opts.speaker, text, None, None))
        return turns

    # --- speaking -----------------------------------------------------------------------------

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _backend_future(self) -> asyncio.Task:
        task = self._backend_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._backend_task = asyncio.get_running_loop().create_task(self._open_backend())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by awaiters
        return task

    async def _open_backend(self) -> SpeechBackend:
        # Imported on a worker thread: the in-process backend imports torch (about a second),
        # which must not block the event loop (LiveKit's loop monitor flags 0.5 s).
        if self._url:
            try:
                client = await asyncio.to_thread(importlib.import_module, "csm_plugin.client")
            except ImportError as e:
                raise APIError(
                    "url= needs csm_plugin.client, which this csm-plugin install does not have",
                    retryable=False,
                ) from e
            # One attempt per call: a refused or silent server fails within the call's
            # conn_options.timeout, and LiveKit's own retries (or a FallbackAdapter) take over.
            timeout = DEFAULT_API_CONNECT_OPTIONS.timeout
            backend = client.RemoteBackend(
                self._url, api_key=self._api_key, connect_timeout=timeout, ready_timeout=0,
                request_timeout=timeout, reconnect_timeout=timeout,
            )
            try:
                await asyncio.wait_for(backend.start(), timeout)
            except asyncio.TimeoutError as e:
                await backend.close()
                raise APITimeoutError(f"the CSM server at {self._url} did not answer within {timeout:g} s") from e
            self._owns_backend = True
            return backend
        backend_module = await asyncio.to_thread(importlib.import_module, "csm_plugin.backend")
        return await backend_module.shared_service(
            self._model_name, device=self._device, dtype=self._dtype, **self._service_options
        )

    async def _conversation(self) -> ConversationHandle:
        if self._conv is not None:
            return self._conv
        if self._backend is None:
            # shielded: a cancelled reply must not cancel the (shared) model load
            self._backend = await asyncio.shield(self._backend_future())
        backend = self._backend
        voice, voices = self._voice, None
        if voice is not None and hasattr(backend, "add_voice"):
            name = f"{self._conversation_id}:voice"
            await backend.add_voice(name, text=voice.text, audio=voice.audio, sample_rate=voice.sample_rate)
            voices = {self._opts.speaker: name}  # pinned: never trimmed from the context
        conv = backend.conversation(self._conversation_id, voices=voices)
        if voice is not None and voices is None:
            await conv.add_segment(self._opts.speaker, voice.text, audio=voice.audio, sample_rate=voice.sample_rate)
        self._conv = conv
        return conv

    async def _speak(
        self,
        emitter: tts.AudioEmitter,
        sentences: AsyncIterable[str],
        *,
        on_sentence: Callable[[], None],
        timeout: float,
        options: SpeakOptions,
    ) -> None:
        """Speak each sentence as it arrives, one model frame at a time, into `emitter`, with the
        options the stream was created with. Each wait on the model or the server is bounded by
        the call's conn_options.timeout."""
        task = asyncio.current_task()
        if task is not None:
            self._speaking.add(task)
        try:
            async with self._get_lock():  # one reply at a time; turns are recorded in between
                conv = await _bounded(self._conversation(), timeout, "connecting to CSM")
                self._refresh_io()
                await self._catch_up(conv)
                self._spoken = True
                speech = _Speech()
                self._unsettled.append(speech)
                try:
                    async for text in sentences:
                        if text.strip():
                            on_sentence()
                            await self._speak_sentence(conv, text.strip(), emitter, speech, timeout, options)
                finally:
                    speech.history_len = len(conv.history)
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _api_error(e) from e
        finally:
            if task is not None:
                self._speaking.discard(task)

    async def _speak_sentence(
        self, conv: ConversationHandle, text: str, emitter: tts.AudioEmitter, speech: _Speech, timeout: float,
        options: SpeakOptions,
    ) -> None:
        chunks = conv.speak(text, options).__aiter__()
        frames = 0
        try:
            try:
                chunk = await _bounded(chunks.__anext__(), timeout, "waiting for the first audio")
            except StopAsyncIteration:
                return
            while True:
                pcm = np.ascontiguousarray(chunk.pcm, dtype=np.int16)
                emitter.push_frame(
                    rtc.AudioFrame(
                        data=pcm.tobytes(),
                        sample_rate=chunk.sample_rate,
                        num_channels=NUM_CHANNELS,
                        samples_per_channel=len(pcm),
                    )
                )
                frames += math.ceil(len(pcm) * 1000 / (chunk.sample_rate * FRAME_MS))
                speech.frames_pushed += 1
                await asyncio.sleep(0)  # let the frame go out before the next one
                try:
                    chunk = await _bounded(chunks.__anext__(), timeout, "waiting for the next frame")
                except StopAsyncIteration:
                    break
        finally:
            await chunks.aclose()  # stops generation; the history keeps the frames delivered
            if frames:
                speech.frames.append(frames)


class ChunkedStream(tts.ChunkedStream):
    """`synthesize(text)`: the whole text, sentence by sentence, frame by frame."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions, options: SpeakOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = options  # a snapshot: update_options() applies to the next stream

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
            mime_type="audio/pcm",
            frame_size_ms=FRAME_MS,
        )
        sentences = self._tts._sentence_tokenizer.tokenize(self.input_text)
        await self._tts._speak(
            output_emitter, _aiter(sentences), on_sentence=lambda: None, timeout=self._conn_options.timeout,
            options=self._options,
        )


class SynthesizeStream(tts.SynthesizeStream):
    """`stream()`: text as the LLM produces it; each sentence is spoken once it is complete."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions, options: SpeakOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = options  # a snapshot: update_options() applies to the next stream

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        request_id = utils.shortuuid()
        output_emitter.initialize(
            request_id=request_id,
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
            mime_type="audio/pcm",
            frame_size_ms=FRAME_MS,
            stream=True,
        )
        output_emitter.start_segment(segment_id=request_id)
        sentence_stream = self._tts._sentence_tokenizer.stream()

        async def forward_input() -> None:
            async for data in self._input_ch:
                if isinstance(data, self._FlushSentinel):
                    sentence_stream.flush()
                else:
                    sentence_stream.push_text(data)
            sentence_stream.end_input()

        async def sentences() -> AsyncIterable[str]:
            async for ev in sentence_stream:
                yield ev.token

        forward = asyncio.create_task(forward_input(), name="csm.forward_input")
        try:
            await self._tts._speak(
                output_emitter, sentences(), on_sentence=self._mark_started, timeout=self._conn_options.timeout,
                options=self._options,
            )
        finally:
            await utils.aio.cancel_and_wait(forward)
            await sentence_stream.aclose()
        output_emitter.end_segment()


class _UserAudioTap(io.AudioInput):
    """Passes the session's audio input through unchanged, keeping the recent frames with their
    arrival times, so a committed user turn can be recorded with the user's own voice."""

    def __init__(self, source: io.AudioInput) -> None:
        super().__init__(label="csm.UserAudioTap", source=source)
        self._frames: deque[tuple[float, rtc.AudioFrame]] = deque()

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await super().__anext__()
        self.record(frame, time.time())
        return frame

    def record(self, frame: rtc.AudioFrame, arrived_at: float) -> None:
        self._frames.append((arrived_at, frame))
        while self._frames and arrived_at - self._frames[0][0] > _USER_AUDIO_KEEP_S:
            self._frames.popleft()

    def take(self, metrics: Any) -> tuple[np.ndarray | None, int | None]:
        """Mono float32 audio of the turn the message's metrics time (started/stopped_speaking_at)."""
        start = metrics.get("started_speaking_at") if metrics else None
        stop = metrics.get("stopped_speaking_at") if metrics else None
        if start is None or stop is None:
            return None, None
        start, stop = start - _USER_AUDIO_MARGIN_S, stop + _USER_AUDIO_MARGIN_S
        picked = [f for t, f in self._frames if t > start and t - f.duration < stop]
        while self._frames and self._frames[0][0] - self._frames[0][1].duration < stop:
            self._frames.popleft()  # consumed (and anything older)
        if not picked:
            return None, None
        rate = picked[0].sample_rate
        parts = [
            np.frombuffer(f.data, dtype=np.int16).reshape(-1, f.num_channels).mean(axis=1)
            for f in picked
            if f.sample_rate == rate
        ]
        return (np.concatenate(parts) / 32768.0).astype(np.float32), rate


async def _bounded(awaitable, timeout: float, what: str):
    """`awaitable` within `timeout` seconds (no bound if timeout <= 0), else APITimeoutError."""
    if timeout <= 0:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except asyncio.TimeoutError as e:
        raise APITimeoutError(f"CSM: no answer within {timeout:g} s while {what}") from e


async def _aiter(items: Iterable[str]) -> AsyncIterable[str]:
    for item in items:
        yield item


def _api_error(e: BaseException) -> APIError:
    """csm-plugin errors as LiveKit API errors, so retries and FallbackAdapter work."""
    if isinstance(e, APIError):
        return e
    from csm_plugin import errors

    message = f"{type(e).__name__}: {e}"
    code = getattr(e, "code", None)  # a csm_plugin.client.RemoteError: the server's error code
    if code == "unauthorized":
        return APIStatusError(message, status_code=401)  # a wrong API key: never retried
    if code in ("too_many_streams", "too_many_conversations", "busy"):
        return APIStatusError(message, status_code=429)  # retried later, LiveKit's way
    if code in ("not_ready", "draining", "too_many_connections", "superseded") or type(e).__name__ in (
        "ServerUnavailableError", "ConnectionLostError",
    ):
        return APIConnectionError(message)  # another attempt (or the fallback TTS) may reach a server
    if isinstance(e, (errors.InputError, errors.AudioError, errors.ContextTooLongError, errors.CheckpointError)):
        return APIError(message, retryable=False)  # bad input or model: retrying cannot help
    if isinstance(e, errors.WorkerCrashedError):
        return APIConnectionError(message, retryable=False)  # needs a restart: fall back instead
    if isinstance(e, (errors.EngineError, errors.ConversationBusyError)):
        return APIConnectionError(message)
    if isinstance(e, PermissionError):
        return APIStatusError(message, status_code=401)  # a wrong API key: not retryable
    if isinstance(e, TimeoutError):
        return APITimeoutError(message)
    if isinstance(e, (ConnectionError, OSError)) or type(e).__module__.split(".")[0] in ("aiohttp", "websockets"):
        return APIConnectionError(message)
    if isinstance(e, errors.CSMError):
        return APIError(message)  # other service failures (e.g. remote ones): worth a retry
    return APIError(message, retryable=False)
