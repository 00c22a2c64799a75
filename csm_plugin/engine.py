"""The inference loop: prefill rows into a cache slot, then generate one 80 ms frame at a time.

Sampling noise is drawn per (seed, frame), not from a shared random stream, so a stream's codes do
not depend on what else runs beside it. Temperature + top-k sampling is Gumbel-max over the top-k
logits, which samples softmax(logits / T) restricted to the top k.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Hashable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import GeneratorType

import numpy as np
import torch

from .audio import resample_to_24k
from .errors import ContextTooLongError, EngineError, InputError, WorkerCrashedError
from .models.csm import CSM
from .models.loading import DEFAULT_MODEL, LoadedCheckpoint, load_checkpoint
from .prompt import Segment, audio_rows, segment_rows, text_rows

log = logging.getLogger(__name__)

FRAME_MS = 80


@dataclass(frozen=True)
class Sampling:
    """temperature and top_k as in Sesame's reference (0.9 / 50); top_k=1 is greedy.
    max_audio_ms caps the reply; by default it follows the text length (CSM sometimes never stops)."""

    temperature: float = 0.9
    top_k: int = 50
    seed: int = 0
    max_audio_ms: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an int, got {self.seed!r}")
        if self.max_audio_ms is not None and not self.max_audio_ms >= FRAME_MS:
            raise InputError(f"max_audio_ms must be at least {FRAME_MS}, got {self.max_audio_ms!r}")


def max_frames_for_text(text: str, max_audio_ms: float | None = None) -> int:
    """A generous bound on speech length: 2 s plus 8 characters a second (slow speech is ~12)."""
    if max_audio_ms is None:
        max_audio_ms = 1000 * (2.0 + len(text) / 8.0)
    return max(1, int(max_audio_ms // FRAME_MS))


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) without leaving int64's range (no overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_keys(seeds: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-stream keys [B] for one frame's sampling noise, from seeds and frame numbers [B]."""
    return _hash32(_hash32(seeds & _MASK32) ^ (frames & _MASK32))


def gumbel_noise(keys: torch.Tensor, codebook: int, index: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, n] for codes `index` [B, n] of `codebook`: a pure function of (key, codebook,
    code), computed on the model's device. Counter-based rather than a random stream, so a stream's
    codes do not depend on its batch, and the whole frame can run in one compiled graph."""
    salt = _hash32(keys ^ (codebook * 0x9E3779B9 & _MASK32))  # [B]
    bits = _hash32((salt[:, None] + index) & _MASK32) >> 8  # 24 random bits
    u = (bits.float() + 0.5) / (1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def top_k_bucket(max_top_k: int, vocab: int) -> int:
    """The static top-k width for a batch: the next power of two (few distinct compiled shapes)."""
    return min(vocab, 1 << max(0, max_top_k - 1).bit_length())


def sample_topk(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, k_cap: int, keys: torch.Tensor, codebook: int
) -> torch.Tensor:
    """logits [B, V], per-stream temperature [B] and top_k [B] (each <= k_cap), noise keys [B]
    -> codes [B]. Gumbel-max over the top k: samples softmax(logits / T) restricted to the top k;
    top_k 1 is greedy. No host sync and static shapes."""
    scaled = logits.float() / temperature[:, None]
    values, index = torch.topk(scaled, k_cap, dim=-1)  # [B, k_cap], descending
    rank = torch.arange(k_cap, device=logits.device)
    noisy = (values + gumbel_noise(keys, codebook, index)).masked_fill(rank >= top_k[:, None], float("-inf"))
    return index.gather(1, noisy.argmax(-1, keepdim=True))[:, 0]


def feed_frame(model: CSM, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor, static: bool) -> torch.Tensor:
    """Append one generated frame per stream: codes [B, 32] at positions [B] of `slots` [B] ->
    backbone hidden [B, dim]. static: attend over every cache position (later ones masked), so
    one compiled graph serves each batch size whatever the streams' positions."""
    x = model.embed_frame(codes)
    return model.backbone_forward(x, positions[:, None], slots, static=static)[:, -1]


def first_codebooks(
    model: CSM, h: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, k_cap: int, static: bool
) -> torch.Tensor:
    """Backbone hidden h [B, dim] -> codebooks 0 and 1 [B, 2]: codebook 0 from the backbone head,
    then one depth step over h and its embedding (positions 0 and 1, where each frame's depth pass
    starts again) for codebook 1."""
    code0 = sample_topk(model.codebook0_logits(h), temperature, top_k, k_cap, keys, 0)
    x = torch.stack([h, model.embed_code(code0, 0)[:, 0]], dim=1)  # [B, 2, dim]
    d = model.decoder_forward(x, start=0, static=static)[:, -1]
    return torch.stack([code0, sample_topk(model.depth_logits(d, 1), temperature, top_k, k_cap, keys, 1)], dim=1)


def next_codebook(
    model: CSM, previous: torch.Tensor, i: int | torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor,
    top_k: torch.Tensor, k_cap: int, static: bool,
) -> torch.Tensor:
    """Codes [B] of codebook i - 1 -> codes [B] of codebook i (2..31): one depth decoder step.
    static (i a 0-dim tensor): fixed shapes and no host sync, so one compiled graph serves all 30."""
    d = model.decoder_forward(model.embed_code(previous, i - 1), start=i, static=static)[:, -1]
    return sample_topk(model.depth_logits(d, i), temperature, top_k, k_cap, keys, i)


def batch_bucket(batch: int) -> int:
    """Compiled frames run at a few fixed batch sizes (powers of two); smaller batches are padded."""
    return 1 << max(0, batch - 1).bit_length()


class FrameGenerator:
    """Runs a CSM model for streams that each own a backbone cache slot.

    With compile=True each model call of a frame (the backbone step, then 31 depth steps each with
    its sampling) runs as a torch.compile graph, one per batch bucket: CUDA graphs on GPUs
    ("reduce-overhead"), C++ kernels on CPU. Not thread-safe: one thread owns a FrameGenerator
    (the service's inference worker).
    """

    def __init__(self, model: CSM, slots: int = 1, compile: bool = False):
        self.model = model
        self.cfg = model.cfg
        self.device = model.codebook0_head.weight.device
        if compile and model.quantized:
            raise InputError(f"compile does not work with {model.quantized} quantization (torch.compile cannot trace it); choose one")
        self.compiled = compile
        # Compiled batches are padded to a bucket; the padding rows write into a scratch slot.
        self._scratch_slot = slots
        cache_slots, rows = (slots + 1, batch_bucket(slots)) if compile else (slots, slots)
        if model.backbone_cache is None or model.backbone_cache.slots < cache_slots or model.decoder_cache.slots < rows:
            model.setup_caches(cache_slots, max_batch=rows)
        self._codebook_index = torch.arange(self.cfg.num_codebooks, device=self.device)
        self._feed_frame, self._first_codebooks, self._next_codebook = feed_frame, first_codebooks, next_codebook
        self._cuda_graphs = compile and self.device.type == "cuda"
        if compile:
            from torch._dynamo import config as dynamo_config, mark_static_address

            # One graph per (batch bucket, top-k bucket) pair.
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            # The caches are updated in place at fixed addresses: a CUDA graph must use them where
            # they are, never copy the slot pool into an input buffer of its own (as transformers'
            # StaticCache does).
            for cache in (model.backbone_cache, model.decoder_cache):
                mark_static_address(cache.k)
                mark_static_address(cache.v)
            # GPUs: CUDA graphs replay a step's ~100 kernels as one launch. CPU: a C++ wrapper calls
            # the kernels instead of Python (about a third less time per step at small sizes).
            how = dict(mode="reduce-overhead") if self._cuda_graphs else dict(options={"cpp_wrapper": True})
            # The module-level functions themselves, not closures or partials (those share one code
            # object, hence one cache, between all of them).
            self._feed_frame = torch.compile(feed_frame, dynamic=False, fullgraph=True, **how)
            self._first_codebooks = torch.compile(first_codebooks, dynamic=False, fullgraph=True, **how)
            self._next_codebook = torch.compile(next_codebook, dynamic=False, fullgraph=True, **how)

    @property
    def max_positions(self) -> int:
        return self.cfg.backbone.max_seq_len

    def _run(self, step: Callable, *args) -> torch.Tensor:
        if not self._cuda_graphs:
            return step(self.model, *args)
        # A CUDA graph writes its output into the same memory at every replay: each call starts a
        # new step and the output is copied out before the next replay reuses that memory.
        torch.compiler.cudagraph_mark_step_begin()
        return step(self.model, *args).clone()

    @torch.inference_mode()  # live inputs are inference tensors; compiled graphs are specialized to that
    def warm_up(self, top_k: int = Sampling.top_k) -> None:
        """Compile (and on GPUs capture) the frame step for every batch bucket up to the slot
        count at `top_k`'s width, so no live reply waits for a compile. Other top-k widths compile
        when first used. The warm-up writes only into the scratch slot."""
        if not self.compiled:
            return
        for batch in sorted({batch_bucket(b) for b in range(1, self._scratch_slot + 1)}):
            started = time.perf_counter()
            slots = torch.full((batch,), self._scratch_slot)
            for _ in range(3):  # CUDA graph trees warm up, then record, then replay
                h = self.feed_frames(slots, torch.zeros(batch, self.cfg.num_codebooks, dtype=torch.long), torch.zeros(batch, dtype=torch.long))
                self.sample_frames(h, [0] * batch, [0] * batch, [1.0] * batch, [top_k] * batch)
            log.info("compiled the frame step for %d streams in %.1f s", batch, time.perf_counter() - started)

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write rows [T, 33] at positions start..start+T-1 of `slot`; return the last hidden state [dim]."""
        T = tokens.shape[0]
        if start + T > self.max_positions:
            raise ContextTooLongError(
                f"{start + T} rows do not fit in the model's {self.max_positions} positions"
            )
        x = self.model.embed_rows(tokens[None].to(self.device), mask[None].to(self.device))
        positions = torch.arange(start, start + T, device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        return self.model.backbone_forward(x, positions, slots)[0, -1]

    @torch.inference_mode()
    def feed_frames(self, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one generated frame per stream: codes [B, 32] at positions [B] -> hidden [B, dim]."""
        B = slots.shape[0]
        pad = batch_bucket(B) - B if self.compiled else 0
        if pad:
            slots = torch.cat([slots, torch.full((pad,), self._scratch_slot)])
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(pad)])
        return self._run(self._feed_frame, slots.to(self.device), codes.to(self.device), positions.to(self.device), self.compiled)[:B]

    @torch.inference_mode()
    def sample_frames(
        self, h: torch.Tensor, seeds: list[int], frames: list[int], temperature: list[float], top_k: list[int]
    ) -> torch.Tensor:
        """Backbone hidden h [B, dim] and each stream's seed, frame number, temperature and top_k
        -> codes [B, 32]. A stream's codes depend on its own (seed, frame) only, not on its batch."""
        B = h.shape[0]
        k_cap = top_k_bucket(max(top_k), self.cfg.audio_vocab_size)
        pad = batch_bucket(B) - B if self.compiled else 0
        settings = torch.tensor(
            [[s % 2**32 for s in seeds] + [0] * pad, [f % 2**32 for f in frames] + [0] * pad, list(top_k) + [1] * pad]
        ).to(self.device)
        keys = noise_keys(settings[0], settings[1])
        temperature = torch.tensor(list(temperature) + [1.0] * pad).to(self.device)
        if pad:
            h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        top_k = settings[2]
        static = self.compiled
        codes = list(self._run(self._first_codebooks, h, keys, temperature, top_k, k_cap, static).unbind(1))
        for i in self._codebook_index[2:] if static else range(2, self.cfg.num_codebooks):
            codes.append(self._run(self._next_codebook, codes[-1], i, keys, temperature, top_k, k_cap, static))
        return torch.stack(codes, dim=1)[:B]


@dataclass(frozen=True)
class AudioFrame:
    """One generated 80 ms frame: its codes [32] and its 1920 samples (float32, 24 kHz)."""

    codes: torch.Tensor
    pcm: np.ndarray


class SlotsBusyError(EngineError):
    """Every cache slot has a reply in progress."""


@dataclass
class CachedSegment:
    key: Hashable  # the caller's identity for this segment; equal keys mean equal rows
    start: int
    rows: int


@dataclass
class Slot:
    """What one backbone cache slot holds: a prefix of some conversation's context."""

    owner: Hashable | None = None
    segments: list[CachedSegment] = field(default_factory=list)
    streaming: bool = False  # a reply is generating into it
    busy: bool = False  # a chunked prefill is writing into it

    @property
    def in_use(self) -> bool:
        return self.streaming or self.busy

    @property
    def end(self) -> int:
        return self.segments[-1].start + self.segments[-1].rows if self.segments else 0


@dataclass
class Stream:
    """One utterance being generated into a slot. Frames are fed back into the cache lazily, just
    before the next one is sampled, so a cancelled stream never feeds frames nobody heard."""

    slot: int
    text: str
    sampling: Sampling
    text_start: int  # position of the utterance's first text row
    h: torch.Tensor  # backbone hidden state that predicts the next frame, [1, dim]
    limit: int
    text_rows: int
    codes: list[torch.Tensor] = field(default_factory=list)
    fed: int = 0
    done: bool = False
    # Flow control: frames handed out (worker thread) and taken by the listener (its thread).
    produced: int = 0
    consumed: int = 0

    @property
    def frames_start(self) -> int:
        return self.text_start + self.text_rows


class Engine:
    """A loaded model with its tokenizer and codec, and a pool of cache slots that hold
    conversations' context prefixes. Synchronous and single-threaded: the service's inference
    worker owns it; nothing here knows about asyncio."""

    def __init__(self, checkpoint: LoadedCheckpoint, slots: int = 1, prefill_chunk: int = 256, compile: bool = False):
        self.checkpoint = checkpoint
        self.prefill_chunk = prefill_chunk
        self.tokenizer = checkpoint.tokenizer
        self.codec = checkpoint.codec
        self.generator = FrameGenerator(checkpoint.model, slots=slots, compile=compile)
        self.codec_state = self.codec.decode_state(slots)  # Mimi decoder state: one row per cache slot
        self.slots = [Slot() for _ in range(slots)]
        self._lru: OrderedDict[Hashable, int] = OrderedDict()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        slots: int = 1,
        quantize: str | None = None,
        compile: bool = False,
    ) -> "Engine":
        checkpoint = load_checkpoint(model, device=device, dtype=parse_dtype(dtype), quantize=quantize)
        return cls(checkpoint, slots=slots, compile=compile)

    @property
    def max_positions(self) -> int:
        return self.generator.max_positions

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Mono audio at any rate -> Mimi codes [frames, 32] (on CPU)."""
        wav = resample_to_24k(audio, sample_rate)
        codes = self.codec.encode(torch.from_numpy(wav)[None, None])
        return codes[0].T.cpu()

    # --- slots ---------------------------------------------------------------------------

    def slot_for(self, owner: Hashable) -> int:
        """The slot `owner` holds, or a free one, or the least recently used one (evicted)."""
        if owner in self._lru:
            if self.slots[self._lru[owner]].in_use:
                raise SlotsBusyError(f"the cache of {owner!r} is being written (a prefill or a reply)")
            self._lru.move_to_end(owner)
            return self._lru[owner]
        if len(self._lru) < len(self.slots):
            index = next(i for i, s in enumerate(self.slots) if s.owner is None)
        else:
            evicted = next((o for o, i in self._lru.items() if not self.slots[i].in_use), None)
            if evicted is None:
                raise SlotsBusyError(f"all {len(self.slots)} cache slots are generating; allow more cached conversations")
            index = self._lru.pop(evicted)
            log.debug("evicting the cache of %s", evicted)
        self.slots[index] = Slot(owner)
        self._lru[owner] = index
        return index

    def release(self, owner: Hashable) -> None:
        index = self._lru.pop(owner, None)
        if index is not None:
            self.slots[index] = Slot()

    def cached_keys(self, owner: Hashable) -> list[Hashable]:
        index = self._lru.get(owner)
        return [] if index is None else [s.key for s in self.slots[index].segments]

    def truncate(self, slot: int, position: int) -> None:
        """Forget everything at or after `position`: O(1), later writes overwrite the cache."""
        s = self.slots[slot]
        s.segments = [c for c in s.segments if c.start + c.rows <= position]

    def prefill_context(self, owner: Hashable, context: list[tuple[Hashable, Segment]]) -> int:
        """Make `owner`'s slot hold exactly `context` (keyed segments); returns the slot."""
        return _run_steps(self.prefill_context_steps(owner, context))

    def prefill_context_steps(self, owner: Hashable, context: list[tuple[Hashable, Segment]]) -> Generator[None, None, int]:
        """prefill_context in chunks of `prefill_chunk` rows, yielding after each one. Only rows
        after the longest cached common prefix are computed."""
        slot = self.slot_for(owner)
        state = self.slots[slot]
        cached = state.segments
        keep = 0
        while keep < min(len(cached), len(context)) and cached[keep].key == context[keep][0]:
            keep += 1
        del cached[keep:]
        position = state.end
        parts = [(key, segment_rows(self.tokenizer, seg)) for key, seg in context[keep:]]
        if not parts:
            return slot
        tokens = torch.cat([rows[0] for _, rows in parts])
        mask = torch.cat([rows[1] for _, rows in parts])
        if position + tokens.shape[0] > self.max_positions:
            raise ContextTooLongError(f"{position + tokens.shape[0]} rows do not fit in the model's {self.max_positions} positions")
        state.busy = True
        try:
            for a in range(0, tokens.shape[0], self.prefill_chunk):
                self.generator.prefill(slot, tokens[a : a + self.prefill_chunk], mask[a : a + self.prefill_chunk], start=position + a)
                if a + self.prefill_chunk < tokens.shape[0]:
                    yield
        finally:
            state.busy = False
        for key, (rows, _) in parts:
            cached.append(CachedSegment(key, position, rows.shape[0]))
            position += rows.shape[0]
        return slot

    # --- generation ----------------------------------------------------------------------

    def start(
        self, owner: Hashable, context: list[tuple[Hashable, Segment]], speaker: int, text: str, sampling: Sampling
    ) -> Stream:
        """Prefill the context (what is not cached yet) and the utterance's text rows."""
        return _run_steps(self.start_steps(owner, context, speaker, text, sampling))

    def start_steps(
        self, owner: Hashable, context: list[tuple[Hashable, Segment]], speaker: int, text: str, sampling: Sampling
    ) -> Generator[None, None, Stream]:
        slot = yield from self.prefill_context_steps(owner, context)
        start = self.slots[slot].end
        tokens, mask = text_rows(self.tokenizer.encode_segment_text(speaker, text))
        # Room for at least one frame and the end-of-audio row that closes the segment later.
        limit = min(max_frames_for_text(text, sampling.max_audio_ms), self.max_positions - start - tokens.shape[0] - 1)
        if limit < 1:
            raise ContextTooLongError(f"the context ({start} rows) and the text leave no room for audio")
        h = self.generator.prefill(slot, tokens, mask, start=start)[None]
        self.slots[slot].streaming = True
        self.codec_state.reset_(rows=[slot])
        return Stream(slot, text, sampling, start, h, limit, tokens.shape[0])

    def step(self, stream: Stream) -> AudioFrame | None:
        """Generate and decode the stream's next frame; None (and done) at the end of the audio."""
        return self.step_many([stream])[0]

    @torch.inference_mode()
    def step_many(self, streams: list[Stream]) -> list[AudioFrame | None]:
        """Advance every stream by one frame together: one batched backbone step (each stream at
        its own slot and position), one batched 31-step depth pass and one batched Mimi step.
        Sampling noise is per stream, so each gets the codes it would get alone."""
        g = self.generator
        feed = [s for s in streams if s.fed < len(s.codes)]
        if feed:
            h = g.feed_frames(
                torch.tensor([s.slot for s in feed]),
                torch.stack([s.codes[-1] for s in feed]),
                torch.tensor([s.frames_start + s.fed for s in feed]),
            )
            for s, h_s in zip(feed, h):
                s.h = h_s[None]
                s.fed += 1
        codes = g.sample_frames(
            torch.cat([s.h for s in streams]),
            [s.sampling.seed for s in streams],
            [len(s.codes) for s in streams],
            [s.sampling.temperature for s in streams],
            [s.sampling.top_k for s in streams],
        ).cpu()
        speaking = []
        for s, c in zip(streams, codes):
            if not c.any():  # the end-of-audio frame
                s.done = True
                continue
            s.codes.append(c)
            s.done = len(s.codes) >= s.limit
            speaking.append(s)
        frames: dict[int, AudioFrame] = {}
        if speaking:  # one batched Mimi step; a stream's decoder state is the row of its slot
            rows = torch.tensor([s.slot for s in speaking])
            pcm = self.codec.decode_step(torch.stack([s.codes[-1] for s in speaking])[:, :, None], self.codec_state, rows=rows)
            pcm = pcm[:, 0].float().cpu().numpy()
            frames = {id(s): AudioFrame(s.codes[-1], pcm[i]) for i, s in enumerate(speaking)}
        return [frames.get(id(s)) for s in streams]

    def finish(self, stream: Stream, key: Hashable | None, segment: Segment | None) -> None:
        """Close a stream: the cache keeps `segment` (the utterance as the listener heard it: its
        first frames, perhaps fewer words) under `key`, or nothing if segment is None."""
        stream.done = True
        slot = self.slots[stream.slot]
        slot.streaming = False
        if slot.end != stream.text_start:  # released meanwhile: the next prefill redoes it
            return
        if segment is None:
            self.truncate(stream.slot, stream.text_start)
            return
        frames = 0 if segment.codes is None else segment.codes.shape[0]
        fed = min(stream.fed, frames)
        if frames and segment.text == stream.text and all(torch.equal(segment.codes[i], stream.codes[i]) for i in range(fed)):
            # The text rows and the first frames are in the cache already: add the rest.
            tokens, mask = audio_rows(segment.codes[fed:])
            start = stream.frames_start + fed
        else:
            tokens, mask = segment_rows(self.tokenizer, segment)
            start = stream.text_start
        self.generator.prefill(stream.slot, tokens, mask, start=start)
        rows = start + tokens.shape[0] - stream.text_start
        slot.segments.append(CachedSegment(key, stream.text_start, rows))

    def synthesize(
        self, context: list[Segment], speaker: int, text: str, sampling: Sampling = Sampling()
    ) -> Iterator[AudioFrame]:
        """Speak `text` as `speaker` after `context`, frames as soon as each exists; no caching
        across calls (the service does that)."""
        owner = object()
        stream = self.start(owner, [(object(), s) for s in context], speaker, text, sampling)
        try:
            while not stream.done:
                frame = self.step(stream)
                if frame is not None:
                    yield frame
        finally:
            self.release(owner)


def _run_steps(steps: Generator):
    """Run a step generator to the end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise InputError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


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

