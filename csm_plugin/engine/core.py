"""The Engine: a loaded checkpoint, its frame generator, codec and cache slots; it prefills
conversations' context into slots (reusing the longest cached prefix) and advances streams, one
80 ms frame at a time, batched across streams. Also the Stream and AudioFrame it hands out."""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..audio import resample_to_24k
from ..errors import ContextTooLongError, InputError
from ..models.loading import DEFAULT_MODEL, LoadedCheckpoint, load_checkpoint
from ..prompt import Segment, audio_rows, segment_rows, text_rows
from .frames import Compile, FrameGenerator
from .graphs import GraphedStep
from .sampling import FRAME_MS, Sampling, max_frames_for_text
from .prefixes import PrefixStore, StoredPrefix, shared_prefix
from .slots import CachedSegment, Lease, Slot, SlotPool, SlotReleasedError

log = logging.getLogger(__name__)

__all__ = ["FRAME_MS", "AudioFrame", "Engine", "Stream", "parse_dtype"]


@dataclass(frozen=True)
class AudioFrame:
    """One generated 80 ms frame: its codes [32] and its 1920 samples (float32, 24 kHz)."""

    codes: torch.Tensor
    pcm: np.ndarray
    last: bool = False  # the stream's limit is reached: no frame follows


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
    lease: Lease | None = None  # the slot as it was when the stream started (see SlotPool)
    keep_end: int = -1  # where the context the cache keeps ends (before a style's exemplars); -1: text_start
    codes: list[torch.Tensor] = field(default_factory=list)
    fed: int = 0
    done: bool = False
    finished: bool = False  # closed by Engine.finish
    # Flow control: frames handed out (worker thread) and taken by the listener (its thread).
    produced: int = 0
    consumed: int = 0

    def __post_init__(self):
        if self.keep_end < 0:
            self.keep_end = self.text_start

    @property
    def frames_start(self) -> int:
        return self.text_start + self.text_rows


class Engine:
    """A loaded model with its tokenizer and codec, and a pool of cache slots that hold
    conversations' context prefixes. Synchronous and single-threaded: the service's inference
    worker owns it; nothing here knows about asyncio."""

    def __init__(
        self, checkpoint: LoadedCheckpoint, slots: int = 1, prefill_chunk: int = 256, compile: Compile = False,
        compile_batches: Sequence[int] | None = None,
    ):
        self.checkpoint = checkpoint
        self.prefill_chunk = prefill_chunk
        self.tokenizer = checkpoint.tokenizer
        self.codec = checkpoint.codec
        self.generator = FrameGenerator(checkpoint.model, slots=slots, compile=compile, batches=compile_batches)
        # Mimi decoder state: one row per cache slot, and with fixed shapes (compile True or
        # "graphs") a scratch row for the padding of a batch bucket: the Mimi step is then one
        # GraphedStep (a CUDA graph per bucket on GPUs), like the frame's two.
        self.codec_state = self.codec.decode_state(slots + 1 if self.generator.static else slots)
        self._codec_scratch_row = slots
        self._codec_graphs = GraphedStep(self._decode_rows, self.codec.device, self._decode_scratch, "Mimi step")
        self.slot_pool = SlotPool(slots)
        self.prefixes = PrefixStore()  # pinned voice prompts' rows, shared by new conversations

    @classmethod
    def load(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        slots: int = 1,
        quantize: str | None = None,
        compile: Compile = False,
        compile_batches: Sequence[int] | None = None,
    ) -> "Engine":
        checkpoint = load_checkpoint(model, device=device, dtype=parse_dtype(dtype), quantize=quantize)
        return cls(checkpoint, slots=slots, compile=compile, compile_batches=compile_batches)

    @property
    def max_positions(self) -> int:
        return self.generator.max_positions

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Mono audio at any rate -> Mimi codes [frames, 32] (on CPU)."""
        wav = resample_to_24k(audio, sample_rate)
        codes = self.codec.encode(torch.from_numpy(wav)[None, None])
        return codes[0].T.cpu()

    # --- slots (kept in self.slot_pool; these delegate, for the service and tests) -------------

    @property
    def slots(self) -> list[Slot]:
        return self.slot_pool.slots

    def slot_for(self, owner: Hashable) -> int:
        """The slot `owner` holds, or a free one, or the least recently used one (evicted)."""
        return self.slot_pool.slot_for(owner)

    def release(self, owner: Hashable) -> None:
        self.slot_pool.release(owner)

    def cached_keys(self, owner: Hashable) -> list[Hashable]:
        return self.slot_pool.cached_keys(owner)

    def truncate(self, slot: int, position: int) -> None:
        """Forget everything at or after `position`: O(1), later writes overwrite the cache."""
        self.slot_pool.truncate(slot, position)

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
        shared = shared_prefix([key for key, _ in context])
        if keep < len(shared) and (stored := self.prefixes.get(shared)) is not None:
            keep = self._copy_prefix(slot, stored)  # the pinned voice prompts' rows, computed before
        position = state.end
        parts = [(key, segment_rows(self.tokenizer, seg)) for key, seg in context[keep:]]
        if not parts:
            return slot
        tokens = torch.cat([rows[0] for _, rows in parts])
        mask = torch.cat([rows[1] for _, rows in parts])
        if position + tokens.shape[0] > self.max_positions:
            raise ContextTooLongError(f"{position + tokens.shape[0]} rows do not fit in the model's {self.max_positions} positions")
        lease = self.slot_pool.lease(slot)
        state.busy = True
        try:
            for a in range(0, tokens.shape[0], self.prefill_chunk):
                self.generator.prefill(slot, tokens[a : a + self.prefill_chunk], mask[a : a + self.prefill_chunk], start=position + a)
                if a + self.prefill_chunk < tokens.shape[0]:
                    yield
        except BaseException:  # half-written rows are not recorded as cached
            self.slot_pool.end_write(lease)
            raise
        if not self.slot_pool.end_write(lease):
            raise SlotReleasedError(f"the cache slot of {owner!r} was released during its prefill")
        for key, (rows, _) in parts:
            cached.append(CachedSegment(key, position, rows.shape[0]))
            position += rows.shape[0]
        if shared and shared not in self.prefixes:
            self._store_prefix(slot, len(shared))
        return slot

    def _copy_prefix(self, slot: int, stored: StoredPrefix) -> int:
        """Make `slot` start with a stored prefix; the number of context segments it covers."""
        self.generator.model.backbone_cache.write_rows(slot, stored.k, stored.v)
        segments, start = [], 0
        for key, rows in zip(stored.keys, stored.rows):
            segments.append(CachedSegment(key, start, rows))
            start += rows
        self.slots[slot].segments[:] = segments
        return len(segments)

    def _store_prefix(self, slot: int, count: int) -> None:
        """Keep a copy of the first `count` cached segments' rows of `slot` (its shared prefix)."""
        segments = self.slots[slot].segments[:count]
        length = segments[-1].start + segments[-1].rows
        k, v = self.generator.model.backbone_cache.read_rows(slot, length)
        self.prefixes.put(StoredPrefix(tuple(c.key for c in segments), tuple(c.rows for c in segments), k, v))

    # --- generation ----------------------------------------------------------------------

    def start(
        self, owner: Hashable, context: list[tuple[Hashable, Segment]], speaker: int, text: str, sampling: Sampling,
        *, transient: int = 0,
    ) -> Stream:
        """Prefill the context (what is not cached yet) and the utterance's text rows. The last
        `transient` context segments condition this utterance only (a style's exemplars): when
        the stream finishes, the cache drops them and keeps the utterance right after the rest."""
        return _run_steps(self.start_steps(owner, context, speaker, text, sampling, transient=transient))

    def start_steps(
        self, owner: Hashable, context: list[tuple[Hashable, Segment]], speaker: int, text: str, sampling: Sampling,
        *, transient: int = 0,
    ) -> Generator[None, None, Stream]:
        if not 0 <= transient <= len(context):
            raise InputError(f"transient must be in 0..{len(context)}, got {transient}")
        slot = yield from self.prefill_context_steps(owner, context)
        start = self.slots[slot].end
        keep_end = self.slots[slot].segments[len(context) - transient].start if transient else start
        tokens, mask = text_rows(self.tokenizer.encode_segment_text(speaker, text))
        # Room for at least one frame and the end-of-audio row that closes the segment later.
        limit = min(max_frames_for_text(text, sampling.max_audio_ms), self.max_positions - start - tokens.shape[0] - 1)
        if limit < 1:
            raise ContextTooLongError(f"the context ({start} rows) and the text leave no room for audio")
        h = self.generator.prefill(slot, tokens, mask, start=start)[None]
        self.slots[slot].streaming = True
        self.codec_state.reset_(rows=[slot])
        return Stream(slot, text, sampling, start, h, limit, tokens.shape[0], lease=self.slot_pool.lease(slot), keep_end=keep_end)

    def step(self, stream: Stream) -> AudioFrame | None:
        """Generate and decode the stream's next frame; None (and done) at the end of the audio."""
        frame = self.step_many([stream])[0]
        if isinstance(frame, Exception):
            raise frame
        return frame

    @torch.inference_mode()
    def step_many(self, streams: list[Stream]) -> list[AudioFrame | None | Exception]:
        """Advance every stream by one frame together: one batched backbone step (each stream at
        its own slot and position), one batched 31-step depth pass and one batched Mimi step.
        Sampling noise is per stream, so each gets the codes it would get alone.

        A stream's state changes only once its whole frame exists, so a failed batch leaves
        nothing half applied (cache rows are rewritten in place, the Mimi rows it may have
        advanced are rebuilt from the streams' codes) and is retried stream by stream: each
        entry of the result is the stream's frame, None at its end, or the exception that made
        that stream alone fail."""
        try:
            return self._step(streams)
        except Exception as e:  # noqa: BLE001 - retried below, one stream at a time
            if len(streams) == 1:
                return [e]
            log.warning("a batched frame step failed; retrying its %d streams one by one", len(streams), exc_info=True)
        self._rebuild_codec_rows(streams)
        results: list[AudioFrame | None | Exception] = []
        for stream in streams:
            try:
                results.append(self._step([stream])[0])
            except Exception as e:  # noqa: BLE001 - that stream fails by itself
                results.append(e)
        return results

    def _step(self, streams: list[Stream]) -> list[AudioFrame | None]:
        g = self.generator
        feed = [s for s in streams if s.fed < len(s.codes)]
        hidden = {id(s): s.h for s in streams}
        if feed:  # writes the fed frames' cache rows: the same rows again if this is a retry
            h = g.feed_frames(
                torch.tensor([s.slot for s in feed]),
                torch.stack([s.codes[-1] for s in feed]),
                torch.tensor([s.frames_start + s.fed for s in feed]),
            )
            hidden.update((id(s), h_s[None]) for s, h_s in zip(feed, h))
        codes = g.sample_frames(
            torch.cat([hidden[id(s)] for s in streams]),
            [s.sampling.seed for s in streams],
            [len(s.codes) for s in streams],
            [s.sampling.temperature for s in streams],
            [s.sampling.top_k for s in streams],
        ).cpu()
        speaking = [(s, c) for s, c in zip(streams, codes) if c.any()]  # all zeros: the end-of-audio frame
        pcm = None
        if speaking:  # one batched Mimi step
            pcm = self.decode_frames(torch.stack([c for _, c in speaking]), [s.slot for s, _ in speaking])
        # The whole frame exists: only now does any stream change.
        for s in feed:
            s.h, s.fed = hidden[id(s)], s.fed + 1
        frames: dict[int, AudioFrame] = {}
        for i, (s, c) in enumerate(speaking):
            s.codes.append(c)
            frames[id(s)] = AudioFrame(c, pcm[i], last=len(s.codes) >= s.limit)
        for s in streams:
            s.done = id(s) not in frames or len(s.codes) >= s.limit
        return [frames.get(id(s)) for s in streams]

    @property
    def cuda_graphs(self) -> bool:
        """Whether frames run as CUDA-graph replays (compile True or "graphs", on a GPU,
        CSM_CUDA_GRAPHS not 0, and no capture failed)."""
        return self.generator.static and all(step.graphs for step in (*self.generator.graphed_steps, self._codec_graphs))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """With fixed shapes (compile True or "graphs"): compile and capture the frame's steps and
        the Mimi step for every batch bucket (writing only into scratch rows), so no live reply
        waits for it. Eager: nothing to do."""
        self.generator.warm_up()
        if self.generator.static:
            for batch in reversed(self.generator.batches):  # the largest first, as the generator's
                self._codec_graphs([torch.zeros(batch, self.generator.cfg.num_codebooks, 1, dtype=torch.long),
                                    torch.full((batch,), self._codec_scratch_row)])

    @torch.inference_mode()
    def decode_frames(self, codes: torch.Tensor, slots: list[int]) -> np.ndarray:
        """One Mimi step: each stream's frame codes [n, 32] -> PCM [n, 1920] (float32), the
        decoder state of a stream being the row of its slot (distinct slots)."""
        rows = torch.tensor(slots)
        if not self.generator.static:
            pcm = self.codec.decode_step(codes[:, :, None], self.codec_state, rows=rows)
        else:
            pad = self.generator.bucket(len(slots)) - len(slots)
            if pad:
                rows = torch.cat([rows, torch.full((pad,), self._codec_scratch_row)])
                codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            pcm = self._codec_graphs([codes[:, :, None], rows])[: len(slots)]
        return pcm[:, 0].float().cpu().numpy()

    def _decode_rows(self, codes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.codec.decode_rows(codes, self.codec_state, rows)

    def _decode_scratch(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        codes, rows = tensors
        return [torch.zeros_like(codes), torch.full_like(rows, self._codec_scratch_row)]

    def _rebuild_codec_rows(self, streams: list[Stream]) -> None:
        """Put the Mimi decoder rows of `streams` back to where their codes so far leave them
        (a failed batched step may have advanced some); decoding in one call equals stepping."""
        for s in streams:
            self.codec_state.reset_(rows=[s.slot])
            if s.codes:
                self.codec.decode_step(torch.stack(s.codes).T[None], self.codec_state, rows=torch.tensor([s.slot]))

    def finish(self, stream: Stream, key: Hashable | None, segment: Segment | None) -> None:
        """Close a stream: the cache keeps `segment` (the utterance as the listener heard it: its
        first frames, perhaps fewer words) under `key`, or nothing if segment is None."""
        if stream.finished:
            return
        stream.done = stream.finished = True
        if not self.slot_pool.end_write(stream.lease):  # released meanwhile: never touch it again
            return
        slot = self.slots[stream.slot]
        if slot.end != stream.text_start:  # truncated meanwhile: the next prefill redoes it
            return
        base = stream.keep_end  # after the context the cache keeps (a style's exemplars go)
        self.truncate(stream.slot, base)
        if segment is None:
            return
        frames = segment.frames
        fed = min(stream.fed, frames)
        same = fed == 0 or np.array_equal(np.asarray(segment.codes[:fed]), torch.stack(stream.codes[:fed]).numpy())
        if frames and segment.text == stream.text and same and base == stream.text_start:
            # The text rows and the first frames are in the cache already: add the rest.
            tokens, mask = audio_rows(segment.codes[fed:])
            start = stream.frames_start + fed
        else:  # the whole utterance again, right after the kept context
            tokens, mask = segment_rows(self.tokenizer, segment)
            start = base
        self.generator.prefill(stream.slot, tokens, mask, start=start)
        slot.segments.append(CachedSegment(key, base, start + tokens.shape[0] - base))

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
            self.finish(stream, None, None)
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
