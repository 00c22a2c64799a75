"""The conversation service: many conversations share one model on one inference thread.

A Conversation keeps what was said and how (speaker, text, Mimi codes of both sides), so CSM's
prosody follows the conversation. Its context prefix stays in a KV-cache slot between turns: a new
reply prefills only the rows that are not cached yet, streams audio one 80 ms frame at a time, and
records in the history exactly the frames the listener got (the rules live in
`csm_plugin.conversation.history`; this module applies them to the engine).

    async with CSMService("sesame/csm-1b", device="cuda", dtype="bfloat16") as service:
        conv = service.conversation("call-42")
        await conv.add_segment(1, "Hi, I have a question.", audio=pcm, sample_rate=16_000)
        async for chunk in conv.speak("Sure, go ahead.", speaker=0):
            send(chunk.data)  # 16-bit PCM, 24 kHz mono
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .audio import as_mono, float_to_int16
from .conversation.history import CHARS_PER_SECOND, Event, History, HistoryView, check_played_ms, spoken_text, word_timings
from .conversation.options import SpeakOptions
from .conversation.styles import UnknownTags, check_unknown_tags, split_style_tag
from .conversation.types import (
    FRAME_MS, MAX_INPUT_RATE, MIN_INPUT_RATE, AudioChunk, Origin, Segment, Turn, Word, as_codes, check_name, check_speaker, check_text,
)
from .engine import (
    AudioFrame, Compile, Engine, InferenceWorker, Sampling, SharedKey, SlotReleasedError, SlotsBusyError, Stream, check_compile,
    default_compile, max_frames_for_text,
)
from .errors import AudioError, ConversationBusyError, CSMError, InputError, UnknownStyleError
from .models.loading import DEFAULT_MODEL

log = logging.getLogger(__name__)

__all__ = ["CSMService", "Conversation", "Reply", "AudioChunk", "Turn", "Voice", "Style", "Exemplar", "Word", "SpeakOptions",
           "spoken_text", "word_timings"]


class Voice:
    """A voice prompt: reference audio (as Mimi codes) and its transcript. Conversations that pin
    the same Voice for the same speaker share its cache rows (prefilled once per service)."""

    def __init__(self, name: str, text: str, codes: np.ndarray):
        self.name, self.text, self.codes = name, text, as_codes(codes)

    def same_as(self, text: str, codes: np.ndarray) -> bool:
        return self.text == text and np.array_equal(self.codes, codes)

    def key(self, speaker: int) -> SharedKey:
        return SharedKey((self, speaker))  # by identity: a voice registered again is a new one

    def __repr__(self) -> str:
        return f"Voice({self.name!r}, frames={self.codes.shape[0]})"


@dataclass(frozen=True)
class Exemplar:
    """One exemplar of a style: `speaker` saying `text` in that style (mono audio at any rate)."""

    speaker: int
    text: str
    audio: np.ndarray
    sample_rate: int


class Style:
    """A registered style: exemplar segments (Mimi codes) placed just before a styled reply."""

    def __init__(self, name: str, segments: list[Segment]):
        self.name, self.segments = name, segments

    def __repr__(self) -> str:
        return f"Style({self.name!r}, exemplars={len(self.segments)})"


class CSMService:
    """Loads the model once and serves any number of conversations from one inference thread.

    max_cached_conversations bounds memory: that many conversations keep their KV cache; others
    keep their history and are prefilled again on their next turn. context_budget (positions,
    default the model's 2048) bounds a conversation's context plus the reply being generated.
    quantize="int8" makes CPU decoding about 4x faster. compile: on GPUs a frame runs as three
    CUDA graphs, prepared for batches up to max_cached_conversations while the service starts:
    "graphs" captures them from the model calls as they are (seconds), True from torch.compile'd
    kernels (about a minute per batch size at full size); False runs uncompiled, which on a GPU
    is not real time. None (the default): "graphs" on a GPU, False on a CPU.
    unknown_style_tags: what a leading "[name]" tag that names no registered style does: "drop"
    (removed, the reply is unstyled) or "speak" (spoken as text).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        max_cached_conversations: int = 8,
        context_budget: int | None = None,
        max_text_tokens: int = 400,
        chunk_frames: int = 1,
        quantize: str | None = None,
        compile: Compile | None = None,
        unknown_style_tags: UnknownTags = "drop",
    ):
        if max_cached_conversations < 1:
            raise InputError("max_cached_conversations must be at least 1")
        if chunk_frames < 1:
            raise InputError("chunk_frames must be at least 1")
        if compile is None:
            compile = default_compile(device)
        check_compile(compile)
        self.model, self.device, self.dtype = model, device, dtype
        self.quantize, self.compile = quantize, compile
        self.max_cached_conversations = max_cached_conversations
        self.max_text_tokens = max_text_tokens
        self.chunk_frames = chunk_frames
        self._context_budget = context_budget
        self._worker: InferenceWorker | None = None
        self._encoder: ThreadPoolExecutor | None = None  # input audio is encoded here, not on the worker
        self._start_lock = threading.Lock()
        self._conversations: dict[str, Conversation] = {}
        self._voices: dict[str, Voice] = {}
        self._styles: dict[str, Style] = {}
        self.unknown_style_tags = check_unknown_tags(unknown_style_tags)

    async def start(self) -> CSMService:
        """Load the model on the inference thread (idempotent)."""
        with self._start_lock:
            if self._worker is None:
                self._worker = InferenceWorker(self._load_engine)
        # shield: a caller giving up on the load must not cancel the future the worker settles
        await asyncio.shield(asyncio.wrap_future(self._worker.ready))
        return self

    def _load_engine(self) -> Engine:
        engine = Engine.load(
            self.model, device=self.device, dtype=self.dtype, slots=self.max_cached_conversations,
            quantize=self.quantize, compile=self.compile,
        )
        engine.warm_up()
        return engine

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await asyncio.to_thread(worker.stop)
        if self._encoder is not None:
            encoder, self._encoder = self._encoder, None
            encoder.shutdown(wait=False, cancel_futures=True)
        self._conversations.clear()

    async def __aenter__(self) -> CSMService:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def engine(self) -> Engine:
        if self._worker is None or not self._worker.ready.done():
            raise CSMError("the service is not started: `await service.start()` first")
        return self._worker.ready.result()

    @property
    def alive(self) -> bool:
        """Started and its inference worker running."""
        return self._worker is not None and self._worker.alive

    @property
    def context_budget(self) -> int:
        limit = self.engine.max_positions
        return min(self._context_budget or limit, limit)

    def _submit(self, fn, *args) -> asyncio.Future:
        self.engine  # noqa: B018 - raises if not started
        return asyncio.wrap_future(self._worker.submit(fn, *args))

    def _encode(self, wav: np.ndarray, sample_rate: int) -> asyncio.Future:
        """Mimi-encode input audio on a thread of its own, never on the inference thread: a long
        user turn takes hundreds of milliseconds to encode, and the replies in progress must not
        miss a frame meanwhile. The encoder is only read (the worker's codec state is the
        decoder's), so it runs beside the frame steps; on a GPU, on a CUDA stream of its own."""
        engine = self.engine
        with self._start_lock:
            if self._encoder is None:
                self._encoder = ThreadPoolExecutor(1, thread_name_prefix="csm-encode")
        return asyncio.get_running_loop().run_in_executor(self._encoder, _encode_audio, engine, wav, sample_rate)

    def _text_tokens(self, speaker: int, text: str) -> int:
        return len(self.engine.tokenizer.encode_segment_text(speaker, text))

    def _rows(self, segment: Segment) -> int:
        """Backbone positions of a segment: its text tokens, then its frames and an end frame."""
        return self._text_tokens(segment.speaker, segment.text) + (segment.frames + 1 if segment.codes is not None else 0)

    async def add_voice(self, name: str, *, text: str, audio: np.ndarray, sample_rate: int) -> Voice:
        """Register a named voice prompt (reference audio + its transcript), encoded once.
        Registering the same name with the same content again keeps the voice (and its shared
        cache rows); with other content it replaces it for conversations created afterwards."""
        check_name(name, "voice")
        text = check_text(text)
        wav = _check_audio(audio, sample_rate)
        codes = as_codes(await self._encode(wav, sample_rate))
        voice = self._voices.get(name)
        if voice is None or not voice.same_as(text, codes):
            voice = self._voices[name] = Voice(name, text, codes)
        return voice

    @property
    def voices(self) -> list[str]:
        return sorted(self._voices)

    async def add_style(self, name: str, exemplars: Iterable[Exemplar]) -> Style:
        """Register a style: one or more short exemplars of it, encoded once. A reply spoken with
        `style=name` (or whose text starts with the tag "[name]") is conditioned on them, placed
        just before it; the history does not record them (the listener never heard them)."""
        check_name(name, "style")
        exemplars = list(exemplars)
        if not exemplars or not all(isinstance(e, Exemplar) for e in exemplars):
            raise InputError("a style needs one or more Exemplar(speaker, text, audio, sample_rate)")
        checked = [(check_speaker(e.speaker), check_text(e.text), _check_audio(e.audio, e.sample_rate), e.sample_rate) for e in exemplars]
        segments = [Segment(speaker, text, as_codes(await self._encode(wav, rate))) for speaker, text, wav, rate in checked]
        self._styles[name] = Style(name, segments)
        return self._styles[name]

    @property
    def styles(self) -> list[str]:
        return sorted(self._styles)

    def _style(self, name: str) -> Style:
        if name not in self._styles:
            known = ", ".join(self.styles) or "none registered"
            raise UnknownStyleError(f"unknown style {name!r} (styles: {known}); register it with add_style() first")
        return self._styles[name]

    def conversation(
        self, conversation_id: str, *, voices: Mapping[int, str] | None = None, context_budget: int | None = None
    ) -> Conversation:
        """The conversation with this id, created on first use. `voices` maps speakers to
        registered voice names, pinned at the start of a new conversation's context;
        context_budget (positions) overrides the service's for this conversation."""
        if conversation_id in self._conversations:
            return self._conversations[conversation_id]
        self.engine  # noqa: B018 - raises if not started
        pinned = []
        for speaker, name in (voices or {}).items():
            if name not in self._voices:
                known = ", ".join(self.voices) or "none registered"
                raise InputError(f"unknown voice {name!r} (voices: {known}); register it with add_voice() first")
            pinned.append((check_speaker(speaker), self._voices[name]))
        conv = self._conversations[conversation_id] = Conversation(self, conversation_id, pinned, context_budget)
        return conv


def _encode_audio(engine: Engine, wav: np.ndarray, sample_rate: int) -> torch.Tensor:
    """Engine.encode_audio on the calling (encoder) thread; on CUDA on a side stream, so that its
    kernels do not queue in front of the frame steps on the default stream."""
    device = engine.codec.device
    if device.type != "cuda":
        return engine.encode_audio(wav, sample_rate)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.default_stream(device))  # the weights are ready
    with torch.cuda.stream(stream):
        codes = engine.encode_audio(wav, sample_rate)  # ends with a copy to the host: synchronised
    return codes


def _check_audio(audio: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None:
        raise AudioError("audio needs its sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise AudioError(f"sample_rate must be an int, got {sample_rate!r}")
    if not MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE:
        raise AudioError(f"sample_rate {sample_rate} Hz is outside {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz")
    try:
        wav = as_mono(audio)
    except (TypeError, ValueError) as e:  # e.g. a list of strings
        raise e if isinstance(e, AudioError) else AudioError(f"audio must be an array of samples: {e}") from None
    if len(wav) < sample_rate * FRAME_MS // 1000:
        raise AudioError(f"audio is shorter than one {FRAME_MS} ms frame")
    return wav


class Conversation(HistoryView):
    """One conversation's history and its reply stream. Not shared across event loops.

    Every change to the history is announced to the listeners added with `subscribe` as a list of
    `csm_plugin.conversation.history` events (the server forwards them to its client)."""

    def __init__(
        self, service: CSMService, conversation_id: str, voices: list[tuple[int, Voice]], context_budget: int | None = None
    ):
        self.service = service
        self.id = conversation_id
        self._context_budget = context_budget
        segments = [Segment(speaker, voice.text, voice.codes) for speaker, voice in voices]
        self._history = History(segments, rows=service._rows, budget=self.context_budget)
        # The pinned voices' cache keys: shared with every conversation pinning the same voices.
        self._shared_keys = {turn.id: voice.key(speaker) for turn, (speaker, voice) in zip(self._history.voices, voices)}
        # weak: a reply dropped by its reader (a `break`) must be collectable, so that it finishes
        self._reply_ref: Callable[[], Reply | None] = lambda: None
        self._listeners: list[Callable[[list[Event]], None]] = []
        self._closed = False

    def digest(self, voice_names: Mapping[int, str] | None = None) -> str:
        return self._history.digest(voice_names)

    @property
    def speaking(self) -> bool:
        return self._reply_ref() is not None

    @property
    def context_budget(self) -> int:
        return min(self._context_budget or self.service.context_budget, self.service.context_budget)

    def subscribe(self, listener: Callable[[list[Event]], None]) -> Callable[[], None]:
        """Call `listener(events)` after every change of the history; returns the unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self, events: list[Event]) -> None:
        if not events:
            return
        for listener in list(self._listeners):
            try:
                listener(events)
            except Exception:  # noqa: BLE001 - a listener's bug must not undo the change
                log.exception("conversation %s: a history listener failed", self.id)

    def _check_idle(self) -> None:
        if self._closed:
            raise CSMError(f"conversation {self.id!r} is closed; get a new one from service.conversation()")
        if self._reply_ref() is not None:
            raise ConversationBusyError(
                f"conversation {self.id!r} is speaking; wait for the reply to end or interrupt() it first"
            )

    async def add_segment(
        self,
        speaker: int,
        text: str,
        audio: np.ndarray | None = None,
        sample_rate: int | None = None,
        *,
        codes: np.ndarray | torch.Tensor | None = None,
        origin: Origin = "user",
    ) -> list[Event]:
        """Record a turn. Audio (mono, any rate) is Mimi-encoded, so the speaker's real voice
        conditions later replies; or pass its Mimi `codes` [frames, 32] (e.g. replaying a history
        kept elsewhere). origin is "user" or "agent". The context is prefilled into the cache
        right away, in the background. Returns the history's events."""
        check_speaker(speaker)
        text = check_text(text)
        if origin not in ("user", "agent"):
            raise InputError(f"origin must be 'user' or 'agent', got {origin!r}")
        if audio is not None and codes is not None:
            raise InputError("pass audio or codes, not both")
        self._check_idle()
        if codes is not None:
            codes = as_codes(codes)
            vocab = self.service.engine.checkpoint.config.audio_vocab_size
            if int(codes.max()) >= vocab:
                raise InputError(f"codes must be in 0..{vocab - 1}")
        elif audio is not None:
            wav = _check_audio(audio, sample_rate)
            codes = await self.service._encode(wav, sample_rate)
        self._check_idle()
        events = self._history.record(Segment(speaker, text, codes), origin)
        self._changed(events)
        if self._history.rows < self.context_budget:
            self.service._submit(Engine.prefill_context_steps, self.id, self._keyed()).add_done_callback(_log_failure)
        return events

    def _keyed(self, turns: list[Turn] | None = None) -> list[tuple[Hashable, Segment]]:
        return [(self._shared_keys.get(t.id, t.id), t.segment) for t in (self._history if turns is None else turns)]

    def speak(self, text: str, options: SpeakOptions | None = None, **changes) -> Reply:
        """Speak `text`: audio chunks (chunk_frames x 80 ms) as they are generated. Options are a
        SpeakOptions or its fields as keywords (speaker, temperature, top_k, seed, max_audio_ms,
        chunk_frames). The reply starts (and the conversation is busy) at the first read; bad
        input raises there, changing nothing. Stopping early (break, aclose(), task
        cancellation, an exception, or interrupt()) frees the conversation at once and keeps in
        the history only the frames delivered (or heard) and the words in them."""
        return Reply(self, text, options, changes)

    def _begin(self, reply: Reply) -> list[Turn]:
        """Claim the conversation for `reply` (validated first); the context it is conditioned on."""
        service = self.service
        text = check_text(reply.text)
        options = SpeakOptions.build(reply.options, **reply.changes).with_seed()
        tag, untagged = split_style_tag(text)  # "[comforting] I'm so sorry.": the tag is never spoken
        if tag is not None and (tag in service._styles or service.unknown_style_tags == "drop"):
            text = check_text(untagged)
            options = dataclasses.replace(options, style=tag) if tag in service._styles else options
        style = service._style(options.style) if options.style is not None else None
        tokens = service._text_tokens(options.speaker, text)
        if tokens > service.max_text_tokens:
            raise InputError(f"text is too long: {tokens} tokens, at most {service.max_text_tokens}; split it into sentences")
        self._check_idle()
        exemplar_rows = sum(service._rows(segment) for segment in style.segments) if style is not None else 0
        room = tokens + max_frames_for_text(text, options.max_audio_ms) + 1 + exemplar_rows
        context = self._history.context_for(room, self.context_budget)  # ContextTooLongError leaves us idle
        reply.text, reply.options, reply.style = text, options, style
        self._reply_ref = weakref.ref(reply)
        return context

    async def interrupt(self, played_ms: float | None = None, *, replies: int = 1) -> list[Event]:
        """The listener talked over the reply: stop generating at once. played_ms (audio actually
        played, from the start of the reply) trims the recorded reply to the frames that started
        playing; without it, every delivered frame counts as heard. After a reply has ended,
        trims that reply instead. replies=n: the last n replies were played back to back and
        played_ms counts from the start of the first; each is trimmed, newest first."""
        if played_ms is not None:
            played_ms = check_played_ms(played_ms)
        if isinstance(replies, bool) or not isinstance(replies, int) or replies < 1:
            raise InputError(f"replies must be an int >= 1, got {replies!r}")
        reply = self._reply_ref()
        if reply is not None:
            return reply._interrupt(played_ms, replies)
        if played_ms is None:
            return []
        events = self._history.trim_heard(played_ms, replies)
        self._changed(events)
        return events

    async def close(self) -> None:
        """Forget this conversation and free its cache slot (once nothing writes into it)."""
        if self._closed:
            return
        self._check_idle()
        self._closed = True
        if self.service._conversations.get(self.id) is self:
            del self.service._conversations[self.id]
        await self.service._submit(Engine.release, self.id)


_END = object()  # the reply ended or was stopped: the consumer's next read ends the iteration


class Reply(AsyncIterator[AudioChunk]):
    """One reply being spoken: an async iterator of AudioChunks. Leaving the loop by any road
    (the end, break, aclose(), cancellation, an exception, interrupt()) records the reply as
    heard and frees the conversation right then, not when the iterator is collected."""

    def __init__(self, conv: Conversation, text: str, options: SpeakOptions | None, changes: dict):
        self._conv = conv
        self.text = text
        self.options = options
        self.changes = changes
        self._context: list[Turn] | None = None  # set when the reply claims the conversation
        self.style: Style | None = None  # set with it: the style whose exemplars precede the reply
        self._queue: asyncio.Queue = asyncio.Queue()
        self._started: Future | None = None  # the worker job that prefills and starts the stream
        self._stream: Stream | None = None
        self._pending: list[AudioFrame] = []
        self._words: list = []  # the text's estimated word timings, once it is validated
        self._delivered: list[np.ndarray] = []
        self._completed = False
        self._heard: tuple[float | None, int] | None = None  # interrupt(played_ms, replies)
        self._finished = False

    def __aiter__(self) -> Reply:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._finished:
            raise StopAsyncIteration
        if self._context is None:
            try:
                self._context = self._conv._begin(self)
            except BaseException:
                self._finished = True  # refused: nothing was claimed or changed
                raise
        try:
            if self._started is None:
                await self._start()
            chunk = await self._next_chunk()
        except BaseException:
            self._finish()
            raise
        if chunk is None:
            self._finish()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self._finish()

    def __del__(self) -> None:  # dropped without aclose (a `break` out of `async for`): free it now
        if not getattr(self, "_finished", True):
            try:
                self._finish()
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                log.debug("finishing a dropped reply failed", exc_info=True)

    async def _start(self) -> None:
        conv, service = self._conv, self._conv.service
        worker = service._worker
        if worker is None:
            service.engine  # noqa: B018 - raises "not started"
        loop = asyncio.get_running_loop()
        queue = self._queue
        options = self.options
        sampling = Sampling(options.temperature, options.top_k, options.seed, options.max_audio_ms)
        keyed = conv._keyed(self._context)
        # A style's exemplars condition this reply only: fresh keys, and the cache drops them at the end.
        exemplars = self.style.segments if self.style is not None else []
        keyed += [(object(), segment) for segment in exemplars]
        self._words = word_timings(self.text)

        def on_frame(item) -> None:  # worker thread; raises if the loop is gone (the worker copes)
            loop.call_soon_threadsafe(queue.put_nowait, item)

        text = self.text  # the closures below must not hold the Reply (a dropped reply is finished when collected)

        def start(engine: Engine):  # a step generator: the worker interleaves its prefill chunks
            stream = yield from engine.start_steps(conv.id, keyed, options.speaker, text, sampling, transient=len(exemplars))
            worker.add_stream(stream, on_frame)
            return stream

        self._started = worker.submit(start, wait_for_slot=True)  # replies beyond the slots queue there
        self._stream = await asyncio.wrap_future(self._started)
        # The context is trimmed (if it had to be) only once the reply has started.
        conv._changed(conv._history.keep(self._context))

    async def _next_chunk(self) -> AudioChunk | None:
        chunk_frames = self.options.chunk_frames or self._conv.service.chunk_frames
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return None
            end = item is None or item.last  # the stream ended: what is pending is the final chunk
            if item is not None:
                self._pending.append(item)
                if len(self._pending) < chunk_frames and not end:
                    continue
            frames, self._pending = self._pending, []
            if end:
                self._completed = True
                self._queue.put_nowait(_END)
            chunk = _chunk(self.text, self._words, frames, len(self._delivered), final=end)
            if chunk is None:  # the end came after the last frame's chunk
                return None
            self._delivered.extend(chunk.codes)
            self._stream.consumed += len(frames)
            return chunk

    def _interrupt(self, played_ms: float | None, replies: int) -> list[Event]:
        self._heard = (played_ms, replies)
        return self._finish()

    def _finish(self) -> list[Event]:
        """Record the reply as heard, free the conversation and close the stream (idempotent)."""
        if self._finished:
            return []
        self._finished = True
        if self._context is None:
            return []  # never started: nothing to record or close
        self._queue.put_nowait(_END)  # wakes a consumer waiting for a frame
        conv = self._conv
        if conv._reply_ref() is self:
            conv._reply_ref = lambda: None
        played_ms, replies = self._heard if self._heard is not None else (None, 1)
        events, reply_turn = conv._history.record_heard(
            self.options.speaker, self.text, self._delivered, complete=self._completed, played_ms=played_ms, replies=replies
        )
        conv._changed(events)
        self._close_stream(reply_turn)
        return events

    def _close_stream(self, turn: Turn | None) -> None:
        """Stop the stream and let the cache keep the reply as recorded (thread-safe)."""
        worker = self._conv.service._worker
        if worker is None or self._started is None:
            return
        key, segment = (turn.id, turn.segment) if turn is not None else (None, None)

        def finish(engine: Engine, stream: Stream) -> None:
            worker.remove_stream(stream)
            engine.finish(stream, key, segment)

        if self._stream is not None:
            worker.submit(finish, self._stream).add_done_callback(_log_failure)
            return
        # Stopped while starting: the start job stops at its next prefill chunk (or never runs);
        # if it made its stream just before, that stream is closed as soon as it exists.
        worker.cancel(self._started)

        def close_started(future: Future) -> None:
            if not future.cancelled() and future.exception() is None:
                worker.submit(finish, future.result()).add_done_callback(_log_failure)

        self._started.add_done_callback(close_started)


def _chunk(text: str, words: list, frames: list[AudioFrame], first_frame: int, final: bool) -> AudioChunk | None:
    """Frames as one AudioChunk with the words estimated to start within them (None without
    frames). The final chunk also takes the words whose estimated start lies beyond the audio
    (the reply was capped, or spoken faster than the estimate), placed evenly after the last
    word that fits, so that every word is timed inside the audio produced."""
    if not frames:
        return None
    start_ms = first_frame * FRAME_MS
    end_ms = (first_frame + len(frames)) * FRAME_MS
    in_chunk = tuple(w for w, _, _ in words if start_ms <= w.start_ms < end_ms)
    late = [w for w, _, _ in words if w.start_ms >= end_ms] if final else []
    if late:
        before = [w.start_ms for w, _, _ in words if w.start_ms < end_ms]
        after_ms = max([start_ms, *before[-1:]])
        step = (end_ms - after_ms) / (len(late) + 1)
        in_chunk += tuple(Word(w.text, after_ms + step * (i + 1)) for i, w in enumerate(late))
    pcm = float_to_int16(np.concatenate([f.pcm for f in frames]))
    chars = lambda ms: min(len(text), round(ms / 1000 * CHARS_PER_SECOND))  # noqa: E731
    codes = as_codes(np.stack([np.asarray(f.codes) for f in frames]))
    return AudioChunk(pcm, start_ms, chars(start_ms), len(text) if final else chars(end_ms), in_chunk, codes=codes)


def _log_failure(future) -> None:
    if future.cancelled() or future.exception() is None:
        return
    if isinstance(future.exception(), (SlotsBusyError, SlotReleasedError)):  # skipped; speak() prefills
        log.debug("early prefill skipped: %s", future.exception())
    else:
        log.warning("background cache work failed: %s", future.exception())
