"""The shared vocabulary of a conversation: frames, segments, turns and audio chunks.

Torch-free on purpose: the remote client, the server's wire code and both framework adapters use
these types without loading the model. Mimi codes are compact read-only `uint16` arrays
[frames, 32]; the engine turns them into tensors where it builds prompt rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from ..errors import InputError

FRAME_MS = 80  # one Mimi frame
SAMPLE_RATE = 24_000  # Mimi / CSM output rate
MIN_INPUT_RATE, MAX_INPUT_RATE = 8_000, 192_000  # the rates input audio may have (it is resampled to 24 kHz)
NUM_CODEBOOKS = 32
AUDIO_VOCAB = 2051  # CSM's code ids: Mimi's 2048 and 3 the model may emit (the codec clamps them)

Origin = Literal["voice", "user", "agent"]  # a pinned voice prompt, the user, or the agent's reply
ORIGINS: tuple[str, ...] = get_args(Origin)


def check_speaker(speaker: object) -> int:
    # bool is an int subclass; "[True]" would be a silently wrong prompt.
    if isinstance(speaker, bool) or not isinstance(speaker, int):
        raise InputError(f"speaker must be a non-negative int, got {type(speaker).__name__} {speaker!r}")
    if speaker < 0:
        raise InputError(f"speaker must be a non-negative int, got {speaker}")
    return speaker


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise InputError("text is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can take it
        raise InputError(f"text is not valid Unicode at character {e.start}: {text[e.start:e.end]!r}") from None
    return text.strip()


NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # a voice or style name (also inside a "[style]" tag)
_NAME = re.compile(NAME_PATTERN)


def check_name(name: object, what: str = "name") -> str:
    """A voice or style name: 1-64 of letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InputError(f"{what} name must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit), got {name!r}")
    return name


def check_origin(origin: object) -> Origin:
    if origin not in ORIGINS:
        raise InputError(f"origin must be one of {', '.join(map(repr, ORIGINS))}, got {origin!r}")
    return origin  # type: ignore[return-value]


def as_codes(codes: object) -> np.ndarray:
    """Mimi codes in any integer array form (numpy, a CPU or GPU torch tensor, nested lists)
    -> a read-only uint16 array [frames, 32]; InputError names what is wrong."""
    if hasattr(codes, "detach"):  # a torch tensor, without importing torch
        codes = codes.detach().cpu().numpy()
    try:
        array = np.asarray(codes)
    except (TypeError, ValueError) as e:
        raise InputError(f"codes must be an integer array [frames, {NUM_CODEBOOKS}]: {e}") from None
    if array.ndim != 2 or array.shape[1] != NUM_CODEBOOKS or array.shape[0] == 0:
        raise InputError(f"codes must be [frames, {NUM_CODEBOOKS}] with at least one frame, got {list(array.shape)}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"codes must be integers, got {array.dtype}")
    if int(array.min()) < 0 or int(array.max()) >= AUDIO_VOCAB:
        raise InputError(f"codes must be in 0..{AUDIO_VOCAB - 1}")
    if array.dtype == np.uint16 and not array.flags.writeable:
        return array
    out = array.astype(np.uint16)
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Segment:
    """One turn of a conversation: speaker, text and, when it has audio, its Mimi codes."""

    speaker: int
    text: str
    codes: np.ndarray | None = None  # uint16 [frames, 32], read-only

    def __post_init__(self):
        check_speaker(self.speaker)
        check_text(self.text)
        if self.codes is not None:
            object.__setattr__(self, "codes", as_codes(self.codes))

    @property
    def frames(self) -> int:
        return 0 if self.codes is None else self.codes.shape[0]

    def __repr__(self) -> str:
        return f"Segment(speaker={self.speaker}, text={self.text!r}, frames={self.frames if self.codes is not None else None})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Segment):
            return NotImplemented
        same_codes = (self.codes is None) == (other.codes is None) and (
            self.codes is None or np.array_equal(self.codes, other.codes)
        )
        return self.speaker == other.speaker and self.text == other.text and same_codes

    __hash__ = None  # type: ignore[assignment] - mutable-looking array inside: compare, don't hash


@dataclass(frozen=True, eq=False)
class Turn:
    """A history entry: the segment and where it came from. `id` is unique within its history
    (the engine's cache is keyed by it); `rows` is its length in backbone positions, when known."""

    segment: Segment
    origin: Origin
    id: int = field(default=-1, compare=False)
    rows: int = field(default=0, compare=False)

    def __post_init__(self):
        check_origin(self.origin)

    @property
    def pinned(self) -> bool:
        return self.origin == "voice"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Turn):
            return NotImplemented
        return self.origin == other.origin and self.segment == other.segment

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: float  # estimated, from the start of the utterance


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """One or more 80 ms frames of a reply, with the words they are estimated to cover."""

    pcm: np.ndarray  # int16, mono
    start_ms: float  # offset of the first sample in the utterance
    text_start: int  # estimated character span of the utterance's text
    text_end: int
    words: tuple[Word, ...]  # words estimated to start within this chunk
    codes: np.ndarray | None = field(default=None, kw_only=True)  # uint16 [frames, 32], to replay history elsewhere
    sample_rate: int = field(default=SAMPLE_RATE, kw_only=True)

    @property
    def data(self) -> bytes:
        return self.pcm.tobytes()

    @property
    def duration_ms(self) -> float:
        return 1000 * len(self.pcm) / self.sample_rate

    @property
    def num_frames(self) -> int:
        return len(self.pcm) * 1000 // (self.sample_rate * FRAME_MS)
