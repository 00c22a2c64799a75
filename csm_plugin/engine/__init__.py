"""The inference loop: prefill rows into a cache slot, then generate one 80 ms frame at a time.

    sampling.py  Sampling settings, the reply length bound, seeded Gumbel top-k sampling
    frames.py    one frame's model calls (compilable) and FrameGenerator, which runs them
    graphs.py    GraphedStep: a fixed-shape step replayed as one CUDA graph (compiled engines)
    slots.py     cache slot bookkeeping: owners, cached segments, LRU eviction (SlotPool)
    prefixes.py  shared context prefixes (pinned voice prompts' rows, computed once)
    core.py      Engine (prefill with prefix reuse, batched steps, finish), Stream, AudioFrame
    worker.py    InferenceWorker, the one thread that owns the Engine

The names other modules use are re-exported here, so `from csm_plugin.engine import X` works for
each of them.
"""

from .core import FRAME_MS, AudioFrame, Engine, Stream, parse_dtype
from .frames import (
    Compile, FrameGenerator, batch_bucket, check_compile, default_compile, feed_frame, first_codebooks, next_codebook,
)
from .prefixes import PrefixStore, SharedKey
from .sampling import Sampling, gumbel_noise, max_frames_for_text, noise_keys, sample_topk, top_k_bucket
from .slots import CachedSegment, Lease, Slot, SlotPool, SlotReleasedError, SlotsBusyError
from .worker import InferenceWorker

__all__ = [
    "FRAME_MS",
    "AudioFrame",
    "CachedSegment",
    "Compile",
    "Engine",
    "FrameGenerator",
    "InferenceWorker",
    "Lease",
    "PrefixStore",
    "Sampling",
    "SharedKey",
    "Slot",
    "SlotPool",
    "SlotReleasedError",
    "SlotsBusyError",
    "Stream",
    "batch_bucket",
    "check_compile",
    "default_compile",
    "feed_frame",
    "first_codebooks",
    "gumbel_noise",
    "max_frames_for_text",
    "next_codebook",
    "noise_keys",
    "parse_dtype",
    "sample_topk",
    "top_k_bucket",
]
