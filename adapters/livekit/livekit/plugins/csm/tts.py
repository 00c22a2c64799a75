"""Sesame CSM as a LiveKit Agents TTS that follows the conversation.

CSM conditions every reply on the conversation so far (who said what, and how it sounded). This
TTS keeps one csm-plugin conversation per instance and feeds it from the AgentSession: user turns
(transcript, plus the user's audio when the session's audio input is available) are recorded as
soon as they are committed, the agent's own replies are recorded as the listener heard them, and
a barge-in trims the reply to what was played.

Streamed LLM text is cut at the first clause (`split="clause"`, the project's one rule,
`csm_plugin.conversation.clauses`), so speech starts after the LLM's first few words; each later
piece is the next turn of the same conversation, conditioned on the pieces before it, and its
audio follows the previous piece's in the same output segment.

What was heard: with a session to follow, everything spoken for one agent turn (a LiveKit
SpeechHandle: all its segments, each cut into pieces) sits back to back at the end of the history
until the session's audio output has reported its playback; then the turn keeps exactly what was
played (`trim_heard(played_ms, replies=n)`). A synthesis that can never be played (a
FallbackAdapter's recovery probe, a `synthesize()` outside the session's speech) is taken out of
the history again when it ends. Without a session nothing reports playback, so what was delivered
counts as heard.

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

# torch-free: the import stays light (LiveKit's forkserver preloads plugins)
from csm_plugin.conversation.clauses import SplitMode, TextSplitter, split_text
from csm_plugin.conversation.options import SpeakOptions
from csm_plugin.conversation.styles import StyleTagCarry
from csm_plugin.conversation.types import FRAME_MS, check_name

from .log import logger
from .models import NUM_CHANNELS, SAMPLE_RATE, DTypes, TTSModels, VoicePrompt

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from csm_plugin.backend import ConversationHandle, SpeechBackend


_USER_AUDIO_MARGIN_S = 0.25  # around the session's speech start/stop times
_USER_AUDIO_KEEP_S = 120.0
# A turn still playing holds back the next speech's synthesis (its pieces must stay at the end of
# the history until its playback is known). LiveKit plays one speech at a time, so the wait ends
# with that playback; this bound only guards against an audio output that never reports it.
_TURN_SETTLE_WAIT_S = 60.0
_TURN_POLL_S = 0.05


@dataclass
class _TTSOptions:
    speak: SpeakOptions  # how each piece is spoken (its speaker is the agent)
    user_speaker: int

    @property
    def speaker(self) -> int:
        return self.speak.speaker


@dataclass(frozen=True)
class _Origin:
    """Who asked for a synthesis, noted when the stream is created (in the caller's task)."""

    followed: bool  # a session was followed: its audio output reports what was played
    owner: Any  # the LiveKit SpeechHandle it speaks for, or None
    probe: bool  # a FallbackAdapter's recovery probe: its audio is thrown away


@dataclass(eq=False)
class _Turn:
    """One agent turn: what was spoken for one SpeechHandle (all its segments, each cut into
    pieces), back to back at the end of the history until its playback is settled."""

    owner: Any
    pieces: list[int] = field(default_factory=list)  # frames of each recorded piece, oldest first
    heard_ms: float = 0.0  # playback reported for this turn, from the start of its first piece
    events: int = 0  # playback_finished events matched to it
    interrupted: bool = False
    carry: StyleTagCarry = field(default_factory=StyleTagCarry)  # the reply's style tag, on every piece


@dataclass(eq=False)
class _Utterance:
    """What one stream()/synthesize() attempt spoke."""

    turn: _Turn | None  # the turn it belongs to; None: not tied to the session's playback
    played: bool  # False: it can never be played, so its pieces leave the history when it ends
    pieces: list[int] = field(default_factory=list)
    carry: StyleTagCarry = field(default_factory=StyleTagCarry)


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
        style: str | None = None,
        voice: VoicePrompt | str | None = None,
        conversation_id: str | None = None,
        follow_session: bool = True,
        user_audio: bool = True,
        split: SplitMode = "clause",
        clause_min_words: int = 2,
        clause_max_words: int = 12,
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
            max_audio_ms: cap on each piece's audio (default: from the text's length).
            style: a style registered on the backend that conditions every reply (None: none).
                A reply that starts with a tag, "[calm] ...", picks its own style.
            voice: the agent's voice: a `VoicePrompt` (reference clip + transcript, registered
                once under a name derived from its content) or the name of a voice already
                registered on the backend (a server's voices file).
            conversation_id: id of the model-side conversation (default: a fresh one).
            follow_session: attach to the job's AgentSession automatically.
            user_audio: condition on the user's recorded voice, not only their words.
            split: how streamed LLM text is cut: "clause" (speak from the first clause, each
                later clause a continuation) or "sentence" (whole sentences, `sentence_tokenizer`).
            clause_min_words / clause_max_words: a clause piece has at least min words (short
                ones join the next) and is cut after max words when no punctuation comes.
            sentence_tokenizer: how text is cut into sentences in "sentence" mode.
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
        # split and the clause word counts checked by the one splitter: InputError (a ValueError) if bad
        TextSplitter(split, min_words=clause_min_words, max_words=clause_max_words)
        self._model_name = model
        self._url = url
        self._api_key = api_key
        self._device = device
        self._dtype = dtype
        self._service_options = dict(service_options or {})
        speak = SpeakOptions(speaker, temperature, top_k, seed, max_audio_ms, chunk_frames=1, style=style)
        self._opts = _TTSOptions(speak, user_speaker)
        self._voice_prompt, self._voice_name = _voice(voice)
        self._conversation_id = conversation_id or utils.shortuuid("csm_")
        self._follow_session = follow_session
        self._user_audio = user_audio
        self._split: SplitMode = split
        self._clause_words = (clause_min_words, clause_max_words)
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
        self._turns: list[_Turn] = []  # agent turns whose playback is not settled yet, oldest first
        self._turns_changed: asyncio.Event | None = None
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

    @property
    def voice_name(self) -> str | None:
        """The name the agent's voice has on the backend (derived from a VoicePrompt's content,
        so every TTS with the same prompt shares one registered voice), or None."""
        return self._voice_name

    def update_options(
        self,
        *,
        speaker: NotGivenOr[int] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        top_k: NotGivenOr[int] = NOT_GIVEN,
        seed: NotGivenOr[int | None] = NOT_GIVEN,
        max_audio_ms: NotGivenOr[float | None] = NOT_GIVEN,
        style: NotGivenOr[str | None] = NOT_GIVEN,
    ) -> None:
        changes = {
            "speaker": speaker, "temperature": temperature, "top_k": top_k, "seed": seed,
            "max_audio_ms": max_audio_ms, "style": style,
        }
        given = {name: value for name, value in changes.items() if is_given(value)}
        if given.get("speaker", self._opts.speaker) == self._opts.user_speaker:
            raise ValueError("speaker and user_speaker must differ")
        self._opts.speak = SpeakOptions.build(self._opts.speak, **given)

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> ChunkedStream:
        self._auto_attach()
        return ChunkedStream(
            tts=self, input_text=text, conn_options=conn_options, options=self._opts.speak, origin=self._origin()
        )

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        self._auto_attach()
        return SynthesizeStream(tts=self, conn_options=conn_options, options=self._opts.speak, origin=self._origin())

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
        if self._backend is None:  # a backend given to the constructor is ready as it is
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
        # No one reports their playback any more: the turns stay as they were recorded.
        self._turns.clear()
        self._signal_turns()

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
        # LiveKit plays one speech at a time and reports each of its output segments in order:
        # the event belongs to the speech playing now. Its segments (and the pieces of each)
        # were spoken back to back, so the turn's heard time is the sum of their positions.
        session = self._session
        owner = session.current_speech if session is not None else None
        turn = next((t for t in self._turns if owner is not None and t.owner is owner), None)
        if turn is None:
            return  # audio that is not ours (pre-recorded, another TTS)
        turn.events += 1
        turn.heard_ms += max(0.0, float(ev.playback_position)) * 1000
        turn.interrupted = turn.interrupted or ev.interrupted
        self._schedule_catch_up()

    def _schedule_catch_up(self) -> None:
        self._signal_turns()
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
        """Under the lock: settle the turns whose playback is over (each keeps what was heard),
        then record the session's new turns, in the order they happened. While a turn is still
        playing, user turns wait: the turn's pieces must stay at the end of the history."""
        for turn in list(self._turns):
            if self._settleable(turn):
                await self._settle(conv, turn)
        if any(t.pieces for t in self._turns):
            return
        for speaker, text, audio, rate in self._new_session_turns():
            try:
                await conv.add_segment(speaker, text, audio=audio, sample_rate=rate)
            except Exception as e:  # noqa: BLE001
                if audio is None:
                    logger.warning("could not record a conversation turn: %s", e)
                    continue
                logger.debug("user audio not usable (%s); recording the transcript only", e)
                await conv.add_segment(speaker, text)

    def _settleable(self, turn: _Turn) -> bool:
        """Its playback is over: reported interrupted, its speech done, or the session moved on
        from it after playing some of it (a speech waiting for its tools is not done, yet played).
        An interrupted speech is not enough: its last playback report may still be on its way."""
        owner = turn.owner
        if turn.interrupted or owner.done():
            return True
        current = self._session.current_speech if self._session is not None else None
        return turn.events > 0 and current is not owner

    async def _settle(self, conv: ConversationHandle, turn: _Turn, *, keep: bool = False) -> None:
        """The turn keeps what was played: its pieces are the last history turns, played back
        to back, so the history trims them newest first to the heard time (pieces never played
        leave it). keep: trust the record as it is (no playback report will come)."""
        if turn in self._turns:
            self._turns.remove(turn)
        self._signal_turns()
        n, spoken_ms = len(turn.pieces), sum(turn.pieces) * FRAME_MS
        if keep or not n or turn.heard_ms >= spoken_ms:
            return
        try:
            await conv.interrupt(turn.heard_ms, replies=n)
        except Exception as e:  # noqa: BLE001 - a failed trim must not stop the next reply
            logger.warning("could not trim the reply to what was played: %s", e)

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

    def _signal_turns(self) -> None:
        if self._turns_changed is not None:
            self._turns_changed.set()

    # --- whose synthesis is this --------------------------------------------------------------

    def _origin(self) -> _Origin:
        """Noted when a stream is created, in the task that asks for it: the SpeechHandle it
        speaks for (LiveKit runs a speech's TTS node in that speech's context) and whether it is
        a FallbackAdapter's recovery probe."""
        return _Origin(followed=self._session is not None, owner=self._speech_in_context(), probe=self._in_fallback_probe())

    def _speech_in_context(self) -> Any:
        # LiveKit keeps the speech a task works for in a context variable, which its own tools
        # and tasks read; it is private, so it is looked up defensively.
        try:
            from livekit.agents.voice.agent_activity import _SpeechHandleContextVar
        except ImportError:  # pragma: no cover - another livekit-agents layout
            return self._session.current_speech if self._session is not None else None
        return _SpeechHandleContextVar.get(None)

    def _in_fallback_probe(self) -> bool:
        """A FallbackAdapter tests a failed TTS again by synthesizing the last text in a task of
        its own, whose audio is thrown away. An adapter subscribes to each of its TTSs'
        metrics, which is how it is found; its recovery tasks are private, so any layout this
        does not recognise counts as no probe."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: not inside an adapter's task
            return False
        if task is None:
            return False
        for listener in list(getattr(self, "_events", {}).get("metrics_collected", ())):
            adapter = getattr(listener, "__self__", None)
            if not isinstance(adapter, tts.FallbackAdapter):
                continue
            for status in getattr(adapter, "_status", ()):
                if task in (getattr(status, "recovering_stream_task", None), getattr(status, "recovering_synthesize_task", None)):
                    return True
        return False

    def _utterance(self, origin: _Origin) -> _Utterance:
        """Under the lock, as an attempt starts speaking: the turn it joins, or how it is kept."""
        if origin.probe:
            return _Utterance(None, played=False)
        if not origin.followed or self._session is None:
            return _Utterance(None, played=True)  # nothing reports playback: delivered counts as heard
        owner = origin.owner
        if owner is None or owner.done() or owner.interrupted:
            return _Utterance(None, played=False)  # not for a speech the session will play
        turn = next((t for t in self._turns if t.owner is owner), None)
        if turn is None:
            turn = _Turn(owner)
            self._turns.append(turn)
            owner.add_done_callback(lambda _handle: self._schedule_catch_up())
        return _Utterance(turn, played=True, carry=turn.carry)

    def _must_wait(self, origin: _Origin) -> bool:
        """A speech's pieces go after the previous turn's only once that turn is settled."""
        if origin.probe or not origin.followed or origin.owner is None:
            return False
        return any(t.pieces and t.owner is not origin.owner for t in self._turns)

    # --- speaking -----------------------------------------------------------------------------

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _acquire(self, origin: _Origin) -> None:
        """Take the conversation's lock once no earlier turn holds the end of the history (a
        speech synthesized ahead, e.g. LiveKit's preemptive TTS, waits for the one playing)."""
        lock = self._get_lock()
        if self._turns_changed is None:
            self._turns_changed = asyncio.Event()
        deadline = time.monotonic() + _TURN_SETTLE_WAIT_S
        while True:
            await lock.acquire()
            try:
                if self._must_wait(origin) and self._conv is not None:
                    await self._catch_up(self._conv)
                if not self._must_wait(origin):
                    return
                if time.monotonic() > deadline:
                    logger.warning("no playback report for the previous reply; keeping it as it was delivered")
                    for turn in [t for t in self._turns if t.owner is not origin.owner]:
                        await self._settle(self._conv, turn, keep=True)
                    return
            except BaseException:
                lock.release()
                raise
            lock.release()
            self._turns_changed.clear()
            try:
                await asyncio.wait_for(self._turns_changed.wait(), _TURN_POLL_S)
            except asyncio.TimeoutError:
                pass  # the session may have moved on without an event (current_speech)

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
        prompt, name, voices = self._voice_prompt, self._voice_name, None
        if name is not None and prompt is None:
            voices = {self._opts.speaker: name}  # registered on the backend already (a voices file)
        elif prompt is not None and hasattr(backend, "add_voice"):
            # Once per backend, under a name derived from the prompt's content: every conversation
            # (and every TTS) with this prompt pins the same voice, whose cache rows the
            # service prefills once and shares.
            await prompt.register(backend)
            voices = {self._opts.speaker: name}  # pinned: never trimmed from the context
        conv = backend.conversation(self._conversation_id, voices=voices)
        if prompt is not None and voices is None:
            # a backend that takes no voice prompts (the remote client): the prompt is the first turn
            await conv.add_segment(self._opts.speaker, prompt.text, audio=prompt.audio, sample_rate=prompt.sample_rate)
        self._conv = conv
        return conv

    def _cut(self, text: str) -> list[str]:
        """A whole text cut as stream() cuts streamed text."""
        if self._split == "sentence":
            return list(self._sentence_tokenizer.tokenize(text))
        return split_text(text, "clause", min_words=self._clause_words[0], max_words=self._clause_words[1])

    def _piece_stream(self) -> _PieceStream:
        if self._split == "sentence":
            return _SentencePieces(self._sentence_tokenizer.stream())
        return _ClausePieces(TextSplitter("clause", min_words=self._clause_words[0], max_words=self._clause_words[1]))

    async def _speak(
        self,
        emitter: tts.AudioEmitter,
        pieces: AsyncIterable[str],
        *,
        on_piece: Callable[[], None],
        timeout: float,
        options: SpeakOptions,
        origin: _Origin,
    ) -> None:
        """Speak each piece as it arrives, one model frame at a time, into `emitter`, with the
        options the stream was created with; each piece is the next turn of the conversation,
        its audio straight after the previous piece's. Each wait on the model or the server is
        bounded by the call's conn_options.timeout."""
        task = asyncio.current_task()
        if task is not None:
            self._speaking.add(task)
        try:
            await self._acquire(origin)  # one reply at a time; turns are recorded in between
            try:
                conv = await _bounded(self._conversation(), timeout, "connecting to CSM")
                self._refresh_io()
                await self._catch_up(conv)
                self._spoken = True
                utterance = self._utterance(origin)

                def recorded(frames: int) -> None:
                    utterance.pieces.append(frames)
                    if utterance.turn is not None:
                        utterance.turn.pieces.append(frames)

                try:
                    async for piece in pieces:
                        if piece.strip():
                            on_piece()
                            text = utterance.carry(piece.strip())  # a reply's tag goes on all its pieces
                            await self._speak_piece(conv, text, emitter, timeout, options, recorded)
                finally:
                    await self._forget_unplayed(conv, utterance)
            finally:
                self._get_lock().release()
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise _api_error(e) from e
        finally:
            if task is not None:
                self._speaking.discard(task)

    async def _forget_unplayed(self, conv: ConversationHandle, utterance: _Utterance) -> None:
        """Under the lock: an attempt that can never be played leaves the history as it found it
        (its pieces are the last turns: nothing else was recorded while it spoke)."""
        if utterance.played or not utterance.pieces:
            return
        try:
            await conv.interrupt(0.0, replies=len(utterance.pieces))
        except Exception as e:  # noqa: BLE001 - the next reply must still be possible
            logger.warning("could not remove a synthesis that was never played: %s", e)

    async def _speak_piece(
        self, conv: ConversationHandle, text: str, emitter: tts.AudioEmitter, timeout: float,
        options: SpeakOptions, recorded: Callable[[int], None],
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
                await asyncio.sleep(0)  # let the frame go out before the next one
                try:
                    chunk = await _bounded(chunks.__anext__(), timeout, "waiting for the next frame")
                except StopAsyncIteration:
                    break
        finally:
            await chunks.aclose()  # stops generation; the history keeps the frames delivered
            if frames:
                recorded(frames)


class ChunkedStream(tts.ChunkedStream):
    """`synthesize(text)`: the whole text, cut as stream() cuts it, piece by piece, frame by frame."""

    def __init__(
        self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions, options: SpeakOptions, origin: _Origin
    ) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = options  # a snapshot: update_options() applies to the next stream
        self._origin = origin

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
            mime_type="audio/pcm",
            frame_size_ms=FRAME_MS,
        )
        await self._tts._speak(
            output_emitter, _aiter(self._tts._cut(self.input_text)), on_piece=lambda: None,
            timeout=self._conn_options.timeout, options=self._options, origin=self._origin,
        )


class SynthesizeStream(tts.SynthesizeStream):
    """`stream()`: text as the LLM produces it; each clause (or sentence, split="sentence") is
    spoken as soon as it is complete, all of it into one output segment."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions, options: SpeakOptions, origin: _Origin) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._tts: TTS = tts
        self._options = options  # a snapshot: update_options() applies to the next stream
        self._origin = origin

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
        pieces = self._tts._piece_stream()

        async def forward_input() -> None:
            try:
                async for data in self._input_ch:
                    if isinstance(data, self._FlushSentinel):
                        pieces.flush()  # the end of a segment: speak what is pending
                    else:
                        pieces.push_text(data)
            finally:
                pieces.end_input()

        forward = asyncio.create_task(forward_input(), name="csm.forward_input")
        try:
            await self._tts._speak(
                output_emitter, pieces, on_piece=self._mark_started, timeout=self._conn_options.timeout,
                options=self._options, origin=self._origin,
            )
        finally:
            await utils.aio.cancel_and_wait(forward)
            await pieces.aclose()
        output_emitter.end_segment()


class _PieceStream(AsyncIterable[str]):
    """Streamed text in, the pieces to speak out (the interface of LiveKit's SentenceStream)."""

    def push_text(self, text: str) -> None: ...
    def flush(self) -> None: ...
    def end_input(self) -> None: ...
    async def aclose(self) -> None: ...


class _ClausePieces(_PieceStream):
    """The project's clause rule (TextSplitter) as a stream of pieces."""

    def __init__(self, splitter: TextSplitter) -> None:
        self._splitter = splitter
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._ended = False

    def push_text(self, text: str) -> None:
        for piece in self._splitter.push(text):
            self._queue.put_nowait(piece)

    def flush(self) -> None:
        if (rest := self._splitter.flush()) is not None:
            self._queue.put_nowait(rest)

    def end_input(self) -> None:
        if not self._ended:
            self._ended = True
            self.flush()
            self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self._ended = True

    async def __aiter__(self):  # type: ignore[override]
        while (piece := await self._queue.get()) is not None:
            yield piece


class _SentencePieces(_PieceStream):
    """A LiveKit sentence tokenizer's stream: whole sentences."""

    def __init__(self, stream: tokenize.SentenceStream) -> None:
        self._stream = stream

    def push_text(self, text: str) -> None:
        self._stream.push_text(text)

    def flush(self) -> None:
        self._stream.flush()

    def end_input(self) -> None:
        self._stream.end_input()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aiter__(self):  # type: ignore[override]
        async for ev in self._stream:
            yield ev.token


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


def _voice(voice: VoicePrompt | str | None) -> tuple[VoicePrompt | None, str | None]:
    """(prompt to register, name on the backend) for the `voice=` option."""
    if voice is None:
        return None, None
    if isinstance(voice, str):
        return None, check_name(voice, "voice")  # InputError (a ValueError) for a bad name
    if isinstance(voice, VoicePrompt):
        return voice, voice.name
    raise TypeError(f"voice must be a csm.VoicePrompt or the name of a registered voice, got {type(voice).__name__}")
