"""The conversation service: many conversations share one model on one inference thread.

A Conversation keeps what was said and how (speaker, text, Mimi codes of both sides), so CSM's
prosody follows the conversation. Its context prefix stays in a KV-cache slot between turns: a new
reply prefills only the rows that are not cached yet, streams audio one 80 ms frame at a time, and
records in the history exactly the frames the listener got.

    async with CSMService("sesame/csm-1b", device="cuda", dtype="bfloat16") as service:
        conv = service.conversation("call-42")
        await conv.add_segment(1, "Hi, I have a question.", audio=pcm, sample_rate=16_000)
        async for chunk in conv.speak("Sure, go ahead.", speaker=0):
            send(chunk.data)  # 16-bit PCM, 24 kHz mono
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .audio import SAMPLE_RATE, as_mono, float_to_int16
from .engine import FRAME_MS, Engine, InferenceWorker, Sampling, SlotsBusyError, Stream, max_frames_for_text
from .errors import AudioError, ContextTooLongError, ConversationBusyError, CSMError, InputError
from .models.loading import DEFAULT_MODEL
from .prompt import Segment, check_speaker, check_text

log = logging.getLogger(__name__)

# Typical conversational speaking rate, used to estimate which words a stretch of audio covers.
CHARS_PER_SECOND = 14.0
MIN_INPUT_RATE, MAX_INPUT_RATE = 8_000, 192_000


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: float  # estimated, from the start of the utterance


@dataclass(frozen=True)
class AudioChunk:
    """One or more 80 ms frames of a reply, with the words they are estimated to cover."""

    pcm: np.ndarray  # int16, mono
    start_ms: float  # offset of the first sample in the utterance
    text_start: int  # estimated character span of the utterance's text
    text_end: int
    words: tuple[Word, ...]  # words estimated to start within this chunk
    codes: torch.Tensor | None = None  # the chunk's Mimi codes [frames, 32], e.g. to replay history elsewhere
    sample_rate: int = SAMPLE_RATE

    @property
    def data(self) -> bytes:
        return self.pcm.tobytes()

    @property
    def duration_ms(self) -> float:
        return 1000 * len(self.pcm) / self.sample_rate

    @property
    def num_frames(self) -> int:
        return len(self.pcm) * 1000 // (self.sample_rate * FRAME_MS)


def word_timings(text: str) -> list[tuple[Word, int, int]]:
    """(word, char start, char end) with start times from the speaking-rate estimate."""
    return [
        (Word(m.group(), 1000 * m.start() / CHARS_PER_SECOND), m.start(), m.end()) for m in re.finditer(r"\S+", text)
    ]


def spoken_text(text: str, heard_ms: float) -> str:
    """The words of `text` that started within the first `heard_ms` (at least the first word)."""
    words = [w.text for w, _, _ in word_timings(text) if w.start_ms < heard_ms]
    return " ".join(words) or text.split()[0]


@dataclass(frozen=True)
class Voice:
    """A voice prompt: reference audio (as Mimi codes) and its transcript."""

    name: str
    text: str
    codes: torch.Tensor


@dataclass(frozen=True)
class Turn:
    """A history entry and where it came from: "voice" (a pinned prompt), "user" or "agent"."""

    segment: Segment
    origin: str


@dataclass(frozen=True)
class _Entry:
    key: int  # unique per recorded segment; the engine's cache is keyed by it
    segment: Segment
    rows: int
    origin: str  # "voice", "user" or "agent"

    @property
    def pinned(self) -> bool:
        return self.origin == "voice"


_keys = itertools.count()
_INTERRUPT = object()


class CSMService:
    """Loads the model once and serves any number of conversations from one inference thread.

    max_cached_conversations bounds memory: that many conversations keep their KV cache; others
    keep their history and are prefilled again on their next turn. context_budget (positions,
    default the model's 2048) bounds a conversation's context plus the reply being generated.
    quantize="int8" makes CPU decoding about 4x faster; compile=True compiles the frame steps
    (CUDA graphs on GPUs, the fast choice there) for batches up to max_cached_conversations
    while the service starts.
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
        compile: bool = False,
    ):
        if max_cached_conversations < 1:
            raise InputError("max_cached_conversations must be at least 1")
        if chunk_frames < 1:
            raise InputError("chunk_frames must be at least 1")
        self.model, self.device, self.dtype = model, device, dtype
        self.quantize, self.compile = quantize, compile
        self.max_cached_conversations = max_cached_conversations
        self.max_text_tokens = max_text_tokens
        self.chunk_frames = chunk_frames
        self._context_budget = context_budget
        self._worker: InferenceWorker | None = None
        self._start_lock = threading.Lock()
        self._conversations: dict[str, Conversation] = {}
        self._voices: dict[str, Voice] = {}

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
        engine.generator.warm_up()
        return engine

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await asyncio.to_thread(worker.stop)
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

    async def add_voice(self, name: str, *, text: str, audio: np.ndarray, sample_rate: int) -> Voice:
        """Register a named voice prompt (reference audio + its transcript), encoded once."""
        text = check_text(text)
        wav = _check_audio(audio, sample_rate)
        codes = await self._submit(Engine.encode_audio, wav, sample_rate)
        self._voices[name] = Voice(name, text, codes)
        return self._voices[name]

    def conversation(
        self, conversation_id: str, *, voices: Mapping[int, str] | None = None, context_budget: int | None = None
    ) -> Conversation:
        """The conversation with this id, created on first use. `voices` maps speakers to
        registered voice names, pinned at the start of a new conversation's context;
        context_budget (positions) overrides the service's for this conversation."""
        if conversation_id in self._conversations:
            return self._conversations[conversation_id]
        self.engine  # noqa: B018 - raises if not started
        entries = []
        for speaker, name in (voices or {}).items():
            if name not in self._voices:
                raise InputError(f"unknown voice {name!r}; register it with add_voice() first")
            voice = self._voices[name]
            entries.append(self._entry(Segment(check_speaker(speaker), voice.text, voice.codes), "voice"))
        conv = self._conversations[conversation_id] = Conversation(self, conversation_id, entries, context_budget)
        return conv

    def _entry(self, segment: Segment, origin: str) -> _Entry:
        text_tokens = len(self.engine.tokenizer.encode_segment_text(segment.speaker, segment.text))
        audio = 0 if segment.codes is None else segment.codes.shape[0] + 1
        return _Entry(next(_keys), segment, text_tokens + audio, origin)


def _check_audio(audio: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None:
        raise AudioError("audio needs its sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise AudioError(f"sample_rate must be an int, got {sample_rate!r}")
    if not MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE:
        raise AudioError(f"sample_rate {sample_rate} Hz is outside {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz")
    wav = as_mono(audio)
    if len(wav) < sample_rate * FRAME_MS // 1000:
        raise AudioError(f"audio is shorter than one {FRAME_MS} ms frame")
    return wav


def _check_codes(codes, vocab: int) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or codes.shape[1] != 32 or codes.shape[0] == 0:
        raise InputError(f"codes must be [frames, 32] with at least one frame, got {list(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise InputError(f"codes must be integers, got {codes.dtype}")
    if int(codes.min()) < 0 or int(codes.max()) >= vocab:
        raise InputError(f"codes must be in 0..{vocab - 1}")
    return codes.to(torch.long).cpu()


class Conversation:
    """One conversation's history and its reply stream. Not shared across event loops."""

    def __init__(self, service: CSMService, conversation_id: str, entries: list[_Entry], context_budget: int | None = None):
        self.service = service
        self.id = conversation_id
        self._context_budget = context_budget
        self._entries = entries
        self._busy = False
        self._queue: asyncio.Queue | None = None
        self._heard_frames: int | None = None

    @property
    def history(self) -> list[Segment]:
        """The context the next reply is conditioned on, oldest first (pinned voices included)."""
        return [e.segment for e in self._entries]

    @property
    def turns(self) -> list[Turn]:
        """The history with each entry's origin."""
        return [Turn(e.segment, e.origin) for e in self._entries]

    @property
    def speaking(self) -> bool:
        return self._busy

    def _check_idle(self) -> None:
        if self._busy:
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
        codes: torch.Tensor | np.ndarray | None = None,
        origin: str = "user",
    ) -> None:
        """Record a turn. Audio (mono, any rate) is Mimi-encoded, so the speaker's real voice
        conditions later replies; or pass its Mimi `codes` [frames, 32] (e.g. replaying a history
        kept elsewhere). origin is "user" or "agent". The context is prefilled into the cache
        right away, in the background."""
        check_speaker(speaker)
        text = check_text(text)
        if origin not in ("user", "agent"):
            raise InputError(f"origin must be 'user' or 'agent', got {origin!r}")
        if audio is not None and codes is not None:
            raise InputError("pass audio or codes, not both")
        self._check_idle()
        if codes is not None:
            codes = _check_codes(codes, self.service.engine.checkpoint.config.audio_vocab_size)
        elif audio is not None:
            wav = _check_audio(audio, sample_rate)
            codes = await self.service._submit(Engine.encode_audio, wav, sample_rate)
        self._check_idle()
        self._entries.append(self.service._entry(Segment(speaker, text, codes), origin))
        if sum(e.rows for e in self._entries) < self.context_budget:
            context = [(e.key, e.segment) for e in self._entries]
            self.service._submit(Engine.prefill_context_steps, self.id, context).add_done_callback(_log_failure)

    async def speak(
        self,
        text: str,
        *,
        speaker: int = 0,
        temperature: float = 0.9,
        top_k: int = 50,
        seed: int | None = None,
        max_audio_ms: float | None = None,
        chunk_frames: int | None = None,
    ) -> AsyncIterator[AudioChunk]:
        """Speak `text` as `speaker`: audio chunks (chunk_frames x 80 ms) as they are generated.
        Stopping early (break, aclose(), task cancellation or interrupt()) keeps in the history
        only the frames delivered (or heard) and the words estimated to be in them."""
        text = check_text(text)
        check_speaker(speaker)
        sampling = Sampling(temperature, top_k, secrets.randbits(31) if seed is None else seed, max_audio_ms)
        chunk_frames = chunk_frames or self.service.chunk_frames
        service = self.service
        tokens = len(service.engine.tokenizer.encode_segment_text(speaker, text))
        if tokens > service.max_text_tokens:
            raise InputError(f"text is too long: {tokens} tokens, at most {service.max_text_tokens}; split it into sentences")
        self._check_idle()
        context = self._context_for(tokens, text, sampling)
        self._busy = True
        self._heard_frames = None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._queue = queue
        worker = service._worker

        def on_frame(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def start(engine: Engine):  # a step generator: the worker interleaves its prefill chunks
            stream = yield from engine.start_steps(self.id, [(e.key, e.segment) for e in context], speaker, text, sampling)
            worker.add_stream(stream, on_frame)
            return stream

        stream: Stream | None = None
        started = None
        delivered: list[torch.Tensor] = []
        completed = False
        try:
            started = worker.submit(start, wait_for_slot=True)  # replies beyond the slots queue there
            stream = await asyncio.wrap_future(started)
            self._entries = context  # trimmed (if it had to be) only once the reply has started
            words = word_timings(text)
            pending: list = []
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _INTERRUPT:
                    break
                if item is not None:
                    pending.append(item)
                if pending and (len(pending) >= chunk_frames or item is None):
                    chunk = _chunk(text, words, pending, len(delivered), final=item is None)
                    delivered.extend(f.codes for f in pending)
                    stream.consumed += len(pending)
                    pending = []
                    yield chunk
                if item is None:
                    completed = True
                    break
        finally:
            self._queue = None
            self._busy = False
            if stream is not None:
                self._finish(stream, self._record_reply(speaker, text, delivered, completed))
            elif started is not None:  # cancelled while starting: close the stream once it exists
                started.add_done_callback(lambda f: not f.cancelled() and f.exception() is None and self._finish(f.result(), None))

    def _record_reply(self, speaker: int, text: str, delivered: list, completed: bool) -> _Entry | None:
        """Add the reply as heard to the history: the delivered (or heard) frames and their words."""
        kept = delivered[: self._heard_frames] if self._heard_frames is not None else delivered
        if not kept:
            return None
        heard_all = completed and len(kept) == len(delivered)
        said = text if heard_all else spoken_text(text, len(kept) * FRAME_MS)
        entry = self.service._entry(Segment(speaker, said, torch.stack(kept)), "agent")
        self._entries.append(entry)
        return entry

    def _finish(self, stream: Stream, entry: _Entry | None) -> None:
        """Stop the stream and let the cache keep the reply as recorded (thread-safe)."""
        worker = self.service._worker

        def finish(engine: Engine) -> None:
            worker.remove_stream(stream)
            engine.finish(stream, entry and entry.key, entry and entry.segment)

        if worker is not None:
            worker.submit(finish).add_done_callback(_log_failure)

    async def interrupt(self, played_ms: float | None = None) -> None:
        """The listener talked over the reply: stop generating within one frame. played_ms (audio
        actually played, from the start of the reply) trims the recorded reply to the frames that
        started playing; without it, every delivered frame counts as heard. After a reply has
        ended, trims that last reply instead."""
        heard = None if played_ms is None else max(0, math.ceil(played_ms / FRAME_MS))
        if self._busy:
            self._heard_frames = heard
            if self._queue is not None:
                self._queue.put_nowait(_INTERRUPT)
            return
        last = self._entries[-1] if self._entries else None
        if heard is None or last is None or last.origin != "agent" or last.segment.codes is None:
            return
        if heard >= last.segment.codes.shape[0]:
            return
        self._entries.pop()
        if heard:
            seg = last.segment
            self._entries.append(
                self.service._entry(Segment(seg.speaker, spoken_text(seg.text, heard * FRAME_MS), seg.codes[:heard]), "agent")
            )

    @property
    def context_budget(self) -> int:
        return min(self._context_budget or self.service.context_budget, self.service.context_budget)

    def _context_for(self, text_tokens: int, text: str, sampling: Sampling) -> list[_Entry]:
        """The entries to condition on: all of them if they fit with room for the reply, else the
        pinned voices and the newest turns that fill about half of what is left."""
        budget = self.context_budget
        room = text_tokens + max_frames_for_text(text, sampling.max_audio_ms) + 1
        pinned = [e for e in self._entries if e.pinned]
        turns = [e for e in self._entries if not e.pinned]
        pinned_rows = sum(e.rows for e in pinned)
        if pinned_rows + room > budget:
            raise ContextTooLongError(
                f"the voice prompts ({pinned_rows} rows) and this reply (up to {room} rows) exceed the "
                f"context budget of {budget} positions; use a shorter text or voice prompt"
            )
        if pinned_rows + sum(e.rows for e in turns) + room <= budget:
            return list(self._entries)
        keep: list[_Entry] = []
        total = pinned_rows
        for e in reversed(turns):
            if total + e.rows > (budget - room + pinned_rows) // 2:
                break
            keep.insert(0, e)
            total += e.rows
        log.info("conversation %s: trimmed %d old turns from the context", self.id, len(turns) - len(keep))
        return pinned + keep

    async def close(self) -> None:
        """Forget this conversation and free its cache slot."""
        self._check_idle()
        self.service._conversations.pop(self.id, None)
        await self.service._submit(Engine.release, self.id)


def _chunk(text: str, words: list, frames: list, first_frame: int, final: bool) -> AudioChunk:
    start_ms = first_frame * FRAME_MS
    end_ms = (first_frame + len(frames)) * FRAME_MS
    pcm = float_to_int16(np.concatenate([f.pcm for f in frames]))
    in_chunk = tuple(w for w, _, _ in words if start_ms <= w.start_ms < end_ms or (final and w.start_ms >= end_ms))
    chars = lambda ms: min(len(text), round(ms / 1000 * CHARS_PER_SECOND))  # noqa: E731
    codes = torch.stack([f.codes for f in frames])
    return AudioChunk(pcm, start_ms, chars(start_ms), len(text) if final else chars(end_ms), in_chunk, codes)


def _log_failure(future) -> None:
    if future.cancelled() or future.exception() is None:
        return
    if isinstance(future.exception(), SlotsBusyError):  # early prefill skipped; speak() prefills
        log.debug("no free cache slot for an early prefill")
    else:
        log.warning("background cache work failed: %s", future.exception())
