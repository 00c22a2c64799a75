"""Preemption: a stream gives its cache slot up (suspend) and takes one again later (resume).

A stream whose listener has fallen behind does not generate (the worker skips it), but it holds
its KV-cache slot, and a reply that waits for a slot would wait for it. Suspending it frees the
slot: the stream keeps its own state (codes so far, sampling, text, positions) plus a host copy
of what its slot held for it: the backbone cache rows up to its last fed frame and its Mimi
decoder row. Resuming takes a slot for the same owner (a waiting reply's way: SlotsBusyError
when every slot is generating), writes back the rows the slot no longer holds (none of the
context if nobody took the slot meanwhile, all of them if it was handed on) and the decoder
row. Sampling noise depends only on (seed, frame), and the restored rows are bit for bit the
ones the stream left, so a suspended and resumed stream produces exactly the codes and audio of
one never interrupted.

Why copies rather than a re-prefill: the engine does not know the stream's context segments or
speaker (the caller passed them to start_steps and keeps them), a copy is exact where a
re-prefill of frames in one pass may round differently than frame-by-frame feeding, and a copy
costs a memory transfer, not a backbone pass over up to the whole context, nor a Mimi pass over
every frame so far on the one inference thread. The price is host memory: about 32 KiB per
cached position for CSM-1B in bf16 (`Suspended.nbytes`); the worker bounds the total.

Engine internals used: engine.slot_pool (slot_for, lease, holds, end_write, slots[i].segments /
streaming / generation), engine.generator.model.backbone_cache.k / .v ([layers, slots, kv_heads,
positions, head_dim]), engine.codec_state (a MimiDecodeState: per-row tensors, rows on dim 1 of
k_cache / v_cache and on dim 0 of the others), and Stream's fields.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from .core import Engine, Stream
from .slots import CachedSegment, Lease, SlotReleasedError

__all__ = ["Suspended", "resume", "suspend"]

_NO_GENERATION = -1  # no slot ever has it: a lease with it holds nothing and writes nowhere


@dataclass(eq=False)
class Suspended:
    """A stream out of the batch, without a slot: what it needs to take one again."""

    stream: Stream
    owner: Hashable
    slot: int  # the slot it left, and that slot's generation then
    generation: int
    segments: list[CachedSegment]  # the context the slot held for it (keys, positions)
    k: torch.Tensor  # backbone cache rows 0..rows-1: [layers, kv_heads, rows, head_dim], on the host
    v: torch.Tensor
    codec: list[torch.Tensor] = field(default_factory=list)  # its Mimi decoder row, on the host

    @property
    def rows(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, *self.codec))


def snapshot_bytes(engine: Engine, stream: Stream) -> int:
    """What suspending `stream` would keep on the host (for the worker's budget)."""
    cache = engine.generator.model.backbone_cache
    per_row = cache.k[:, 0, :, 0].numel() * cache.k.element_size() * 2
    codec = sum(t.numel() // n * t.element_size() for t, n in _codec_tensors(engine.codec_state))
    return (stream.frames_start + stream.fed) * per_row + codec


@torch.inference_mode()
def suspend(engine: Engine, stream: Stream) -> Suspended:
    """Take `stream` out of its slot: copy what the slot holds for it to the host, stop writing
    (the slot can be evicted and handed on like any idle one; its context stays cached until
    then) and make its lease one that never holds. Engine.finish on it then touches no slot."""
    pool = engine.slot_pool
    if stream.lease is None or not pool.holds(stream.lease):
        raise SlotReleasedError("the stream's slot was handed on; it cannot be suspended")
    slot = pool.slots[stream.slot]
    rows = stream.frames_start + stream.fed
    cache = engine.generator.model.backbone_cache
    suspended = Suspended(
        stream,
        slot.owner,
        stream.slot,
        slot.generation,
        [CachedSegment(c.key, c.start, c.rows) for c in slot.segments if c.start + c.rows <= stream.text_start],
        cache.k[:, stream.slot, :, :rows].to("cpu", copy=True),
        cache.v[:, stream.slot, :, :rows].to("cpu", copy=True),
        [t.select(dim, stream.slot).to("cpu", copy=True) for t, dim in _codec_rows(engine.codec_state)],
    )
    pool.end_write(stream.lease)  # (freed now if its owner let go meanwhile: resume takes a new one)
    stream.lease = Lease(stream.slot, _NO_GENERATION)
    return suspended


@torch.inference_mode()
def resume(engine: Engine, suspended: Suspended) -> Stream:
    """Give a suspended stream a slot again, holding exactly what it left. Raises SlotsBusyError
    (having changed nothing) when every slot is generating; call again later."""
    pool = engine.slot_pool
    stream = suspended.stream
    index = pool.slot_for(suspended.owner)  # its own slot if still cached, else a free or evicted one
    slot = pool.slots[index]
    kept = (index == suspended.slot and slot.generation == suspended.generation
            and slot.segments == suspended.segments)  # the context is still there: only the reply's rows
    first = stream.text_start if kept else 0
    cache = engine.generator.model.backbone_cache
    cache.k[:, index, :, first : suspended.rows].copy_(suspended.k[:, :, first:])
    cache.v[:, index, :, first : suspended.rows].copy_(suspended.v[:, :, first:])
    slot.segments[:] = [CachedSegment(c.key, c.start, c.rows) for c in suspended.segments]
    for (t, dim), saved in zip(_codec_rows(engine.codec_state), suspended.codec):
        t.select(dim, index).copy_(saved)
    slot.streaming = True
    stream.slot, stream.lease = index, pool.lease(index)
    return stream


def _codec_rows(state) -> list[tuple[torch.Tensor, int]]:
    """The Mimi decoder state's tensors, each with the dimension that indexes rows (slots)."""
    return [*((t, 0) for t in state.conv_tails), *((t, 0) for t in state.convtr_tails),
            (state.k_cache, 1), (state.v_cache, 1), (state.kv_pos, 0), (state.pos, 0)]


def _codec_tensors(state) -> list[tuple[torch.Tensor, int]]:
    """(tensor, rows) for each tensor of the decoder state."""
    return [(t, t.shape[dim]) for t, dim in _codec_rows(state)]
