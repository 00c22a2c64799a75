"""How to speak one reply: the one list of speak options, validated once.

The local service, the remote client, the server's HTTP and WebSocket APIs and both adapters take
a `SpeakOptions`; `speak(text, options, **changes)` accepts the fields as keywords too.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .types import FRAME_MS, check_name, check_speaker

MAX_SEED = 2**62
MAX_TOP_K = 2**31 - 1
MAX_CHUNK_FRAMES = 50


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float that is a finite float too (a 400-digit int is not a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_sampling(temperature: object, top_k: object, seed: object, max_audio_ms: object) -> None:
    """temperature > 0, 1 <= top_k, an int seed (or None), max_audio_ms >= one frame (or None),
    every number finite. One place for the rules the engine's Sampling and SpeakOptions share."""
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    if not (_is_int(top_k) and 1 <= top_k <= MAX_TOP_K):
        raise InputError(f"top_k must be an int in 1..{MAX_TOP_K}, got {top_k!r}")
    if seed is not None and not (_is_int(seed) and -MAX_SEED <= seed <= MAX_SEED):
        raise InputError(f"seed must be an int in -2**62..2**62, got {seed!r}")
    if max_audio_ms is not None and not (_is_number(max_audio_ms) and math.isfinite(max_audio_ms) and max_audio_ms >= FRAME_MS):
        raise InputError(f"max_audio_ms must be a finite number >= {FRAME_MS}, got {max_audio_ms!r}")


@dataclass(frozen=True)
class SpeakOptions:
    """speaker: who speaks. temperature / top_k: sampling as in Sesame's reference (0.9 / 50;
    top_k=1 is greedy). seed: the same seed and context give the same audio (None: random).
    max_audio_ms: caps the reply (default: from the text's length, CSM sometimes never stops).
    chunk_frames: 80 ms frames per audio chunk (None: the service's default).
    style: a registered style (add_style) that conditions this reply alone (None: no style)."""

    speaker: int = 0
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None
    max_audio_ms: float | None = None
    chunk_frames: int | None = None
    style: str | None = None

    def __post_init__(self):
        check_speaker(self.speaker)
        check_sampling(self.temperature, self.top_k, self.seed, self.max_audio_ms)
        if self.chunk_frames is not None and not (_is_int(self.chunk_frames) and 1 <= self.chunk_frames <= MAX_CHUNK_FRAMES):
            raise InputError(f"chunk_frames must be an int in 1..{MAX_CHUNK_FRAMES}, got {self.chunk_frames!r}")
        if self.style is not None:
            check_name(self.style, "style")

    @classmethod
    def build(cls, options: SpeakOptions | None = None, **changes: Any) -> SpeakOptions:
        """`options` (or the defaults) with `changes` applied; InputError for an unknown name."""
        if options is not None and not isinstance(options, SpeakOptions):
            raise InputError(f"options must be a SpeakOptions, got {type(options).__name__}")
        unknown = sorted(set(changes) - FIELDS)
        if unknown:
            raise InputError(f"unknown speak option(s) {unknown}; the options are {sorted(FIELDS)}")
        return dataclasses.replace(options or cls(), **changes)

    def with_seed(self) -> SpeakOptions:
        """These options with a seed fixed now (a random one if unset), so that a reply started
        again (a retry on another socket) says the same."""
        return self if self.seed is not None else dataclasses.replace(self, seed=secrets.randbits(31))

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> SpeakOptions:
        """From the fields of a request (JSON); InputError for unknown or invalid values."""
        return cls.build(None, **dict(data))


FIELDS = frozenset(f.name for f in dataclasses.fields(SpeakOptions))
