"""The wire protocol shared by the server and `csm_plugin.client` (docs/protocol.md describes it).

Client -> server: JSON text messages, validated by the models below. Server -> client: JSON text
messages, plus one binary message of 16-bit PCM after each `chunk` header. Codes travel as
base64 of little-endian uint16 values, frame-major ([frames, 32]); nothing here imports aiohttp.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from ..errors import AudioError, ContextTooLongError, ConversationBusyError, CSMError, EngineError, InputError, UnknownStyleError
from .history import Dropped, Event, Recorded, Removed, Trimmed
from .options import SpeakOptions
from .types import AUDIO_VOCAB, MAX_INPUT_RATE, MIN_INPUT_RATE, NUM_CODEBOOKS, SAMPLE_RATE, AudioChunk, Origin, Segment, Word, as_codes

PROTOCOL_VERSION = 1
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
CONVERSATION_ID_RULE = "a conversation id is 1-128 characters of A-Z a-z 0-9 . _ : - (starting with a letter or digit)"


def valid_conversation_id(value: object) -> bool:
    return isinstance(value, str) and _CONVERSATION_ID.fullmatch(value) is not None


# --- error codes -------------------------------------------------------------------------------

class Code:
    """Stable error codes (the `code` of an `error` message or of an HTTP error body)."""

    UNAUTHORIZED = "unauthorized"
    TOO_MANY_AUTH_FAILURES = "too_many_auth_failures"  # this address failed to authenticate too often
    BAD_MESSAGE = "bad_message"
    MESSAGE_TOO_BIG = "message_too_big"
    TEXT_TOO_LONG = "text_too_long"
    AUDIO_TOO_LONG = "audio_too_long"
    HISTORY_TOO_LONG = "history_too_long"
    CONTEXT_TOO_LONG = "context_too_long"
    INVALID_INPUT = "invalid_input"
    INVALID_AUDIO = "invalid_audio"
    UNKNOWN_VOICE = "unknown_voice"
    UNKNOWN_STYLE = "unknown_style"
    UNKNOWN_CONVERSATION = "unknown_conversation"
    NOT_OPEN = "not_open"
    BUSY = "busy"
    TOO_MANY_CONVERSATIONS = "too_many_conversations"
    TOO_MANY_STREAMS = "too_many_streams"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    DRAINING = "draining"
    NOT_READY = "not_ready"
    SLOW_CONSUMER = "slow_consumer"  # the reader stayed behind real time: the reply ended
    SUPERSEDED = "superseded"
    ENGINE_ERROR = "engine_error"
    INTERNAL = "internal"


class ProtocolError(CSMError):
    """A request the server refuses; `code` is one of `Code`'s values."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error_code(error: BaseException) -> str:
    """The wire code of an error raised while serving a request."""
    if isinstance(error, ProtocolError):
        return error.code
    if isinstance(error, ContextTooLongError):
        return Code.CONTEXT_TOO_LONG
    if isinstance(error, AudioError):
        return Code.INVALID_AUDIO
    if isinstance(error, UnknownStyleError):
        return Code.UNKNOWN_STYLE
    if isinstance(error, InputError):
        return Code.INVALID_INPUT
    if isinstance(error, ConversationBusyError):
        return Code.BUSY
    if isinstance(error, EngineError):
        return Code.ENGINE_ERROR
    return Code.INTERNAL


# --- payload pieces ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class CodesIn(_Strict):
    frames: int = Field(ge=1)
    data: str  # base64, uint16 little-endian, frames * 32 values


class AudioIn(_Strict):
    format: Literal["s16le", "f32le"] = "s16le"
    sample_rate: int
    data: str  # base64 PCM, mono


MAX_SPEAKER = 9999


class SegmentIn(_Strict):
    speaker: int = Field(ge=0, le=MAX_SPEAKER)
    text: str
    origin: Literal["user", "agent"] = "user"
    codes: CodesIn | None = None
    audio: AudioIn | None = None  # HTTP context only; a restore carries codes


# --- client -> server messages -----------------------------------------------------------------

class Open(_Strict):
    type: Literal["open"]
    id: int | None = None
    voices: dict[str, str] = Field(default_factory=dict)  # speaker (as a JSON key) -> voice name
    turns: int = Field(0, ge=0)
    digest: str | None = Field(None, max_length=128)


class Restore(_Strict):
    type: Literal["restore"]
    id: int | None = None
    voices: dict[str, str] = Field(default_factory=dict)
    history: list[SegmentIn] = Field(default_factory=list)


class AddSegment(_Strict):
    type: Literal["add_segment"]
    id: int | None = None
    speaker: int = Field(ge=0, le=MAX_SPEAKER)
    text: str
    audio: AudioIn | None = None
    codes: CodesIn | None = None


class _SpeakRequest(_Strict):
    """A request whose fields besides its own are SpeakOptions' fields, validated there."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    _options: SpeakOptions = PrivateAttr()

    @model_validator(mode="after")
    def _speak_options(self):
        fields = dict(self.model_extra or {})
        temperature = fields.get("temperature")
        if isinstance(temperature, int) and not isinstance(temperature, bool):  # JSON ints are unbounded
            try:
                fields["temperature"] = float(temperature)
            except OverflowError:
                raise InputError(f"temperature must be a finite number, got {temperature}") from None
        self._options = SpeakOptions.from_wire(fields)
        if self._options.speaker > MAX_SPEAKER:
            raise InputError(f"speaker must be at most {MAX_SPEAKER}")
        return self

    @property
    def options(self) -> SpeakOptions:
        return self._options


class Speak(_SpeakRequest):
    type: Literal["speak"]
    id: int | None = None
    text: str


class Interrupt(_Strict):
    type: Literal["interrupt"]
    id: int | None = None
    played_ms: float | None = Field(None, ge=0)
    replies: int = Field(1, ge=1, le=64)  # the last n replies, played back to back (see History.trim_heard)


class Close(_Strict):
    type: Literal["close"]
    id: int | None = None


ClientMessage = Annotated[Open | Restore | AddSegment | Speak | Interrupt | Close, Field(discriminator="type")]
_client_message = TypeAdapter(ClientMessage)


class SpeechRequest(_SpeakRequest):
    """POST /v1/speech: one reply as a WAV file, after an optional context."""

    text: str
    context: list[SegmentIn] = Field(default_factory=list)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: str | bytes) -> Any:
    """JSON text (or UTF-8 bytes) -> Python values; ProtocolError(bad_message) for anything that is
    not valid JSON of valid Unicode: bad UTF-8, nesting too deep for the parser, or a `\\uD800`
    style escape that leaves a lone surrogate (which no tokenizer or encoder can take)."""
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8")
        data = json.loads(raw)
    except RecursionError:
        raise ProtocolError(Code.BAD_MESSAGE, "not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(Code.BAD_MESSAGE, f"not JSON: {e}"[:300]) from None
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the values (a valid pair passes)
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(Code.BAD_MESSAGE, "not valid Unicode: a string holds a lone surrogate escape (\\ud800-\\udfff)") from None
        except (ValueError, RecursionError):  # cannot happen for parsed JSON; refuse rather than fail
            raise ProtocolError(Code.BAD_MESSAGE, "not JSON: nested too deeply") from None
    return data


def parse_client_message(raw: str | bytes) -> Open | Restore | AddSegment | Speak | Interrupt | Close:
    """Parse one text message; ProtocolError(bad_message) with a short reason if it is not valid."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ProtocolError(Code.BAD_MESSAGE, "a message must be a JSON object")
    try:
        return _client_message.validate_python(data)
    except ValidationError as e:
        raise ProtocolError(Code.BAD_MESSAGE, describe_validation_error(e)) from None


def request_id(raw: str | bytes) -> int | None:
    """The `id` of a message that failed validation, if it has a usable one (for the error's `re`)."""
    try:
        value = json.loads(raw).get("id")
    except Exception:  # noqa: BLE001 - anything unparsable has no id
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_voices(voices: Mapping[str, str]) -> dict[int, str]:
    out = {}
    for speaker, name in voices.items():
        if not speaker.isdigit() or len(speaker) > 6:
            raise ProtocolError(Code.BAD_MESSAGE, f"voices: speaker {speaker!r} is not a non-negative integer")
        out[int(speaker)] = name
    return out


# --- codes and audio ---------------------------------------------------------------------------

def encode_codes(codes: np.ndarray | None) -> dict[str, Any] | None:
    if codes is None:
        return None
    array = np.ascontiguousarray(as_codes(codes), dtype="<u2")
    return {"frames": int(array.shape[0]), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_codes(
    codes: CodesIn | Mapping[str, Any] | None, max_frames: int | None = None, vocab: int = AUDIO_VOCAB
) -> np.ndarray | None:
    """Codes from the wire -> a read-only uint16 array [frames, 32]."""
    if codes is None:
        return None
    frames, data = (codes.frames, codes.data) if isinstance(codes, CodesIn) else (codes["frames"], codes["data"])
    if max_frames is not None and frames > max_frames:
        raise ProtocolError(Code.AUDIO_TOO_LONG, f"codes have {frames} frames, at most {max_frames} are allowed")
    raw = _b64(data, "codes")
    if len(raw) != frames * NUM_CODEBOOKS * 2:
        raise ProtocolError(Code.BAD_MESSAGE, f"codes: expected {frames} x {NUM_CODEBOOKS} uint16 values, got {len(raw)} bytes")
    values = np.frombuffer(raw, dtype="<u2")
    if values.size and values.max() >= vocab:
        raise ProtocolError(Code.BAD_MESSAGE, f"codes must be below {vocab}")
    return as_codes(values.reshape(frames, NUM_CODEBOOKS))


def decode_audio(audio: AudioIn, max_seconds: float) -> tuple[np.ndarray, int]:
    """PCM from the wire -> (mono samples, rate); the length limit is checked before decoding."""
    if not MIN_INPUT_RATE <= audio.sample_rate <= MAX_INPUT_RATE:
        raise ProtocolError(Code.INVALID_AUDIO, f"sample_rate {audio.sample_rate} Hz is outside {MIN_INPUT_RATE}..{MAX_INPUT_RATE} Hz")
    raw_len = len(audio.data) * 3 // 4
    width = 2 if audio.format == "s16le" else 4
    if raw_len / width / audio.sample_rate > max_seconds + 1:
        raise ProtocolError(Code.AUDIO_TOO_LONG, f"audio is longer than {max_seconds:g} s")
    raw = _b64(audio.data, "audio")
    if len(raw) % width:
        raise ProtocolError(Code.BAD_MESSAGE, f"audio: {audio.format} data must be a multiple of {width} bytes")
    samples = np.frombuffer(raw, dtype="<i2" if width == 2 else "<f4")
    if len(samples) / audio.sample_rate > max_seconds:
        raise ProtocolError(Code.AUDIO_TOO_LONG, f"audio is {len(samples) / audio.sample_rate:.1f} s, at most {max_seconds:g} s")
    return samples.astype(np.int16 if width == 2 else np.float32), audio.sample_rate


def encode_audio(pcm: np.ndarray) -> dict[str, str]:
    """Mono samples -> the wire format: int16 stays s16le, anything else is sent as f32le."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        return {"format": "s16le", "data": base64.b64encode(pcm.astype("<i2").tobytes()).decode("ascii")}
    return {"format": "f32le", "data": base64.b64encode(pcm.astype("<f4").tobytes()).decode("ascii")}


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(Code.BAD_MESSAGE, f"{what}: data is not valid base64") from None


def segment_out(segment: Segment, origin: Origin) -> dict[str, Any]:
    return {"speaker": segment.speaker, "text": segment.text, "origin": origin, "codes": encode_codes(segment.codes)}


def segment_in(data: Mapping[str, Any]) -> tuple[Segment, Origin]:
    """A segment as the server sent it -> (Segment, origin)."""
    return Segment(data["speaker"], data["text"], decode_codes(data.get("codes"))), data.get("origin", "user")


# --- history events: the server's History changes, applied by the client's -------------------

def events_out(events: list[Event]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, Recorded):
            out.append({"op": "recorded", "segment": segment_out(e.segment, e.origin)})
        elif isinstance(e, Trimmed):
            out.append({"op": "trimmed", "index": e.index, "segment": segment_out(e.segment, "agent")})
        elif isinstance(e, Removed):
            out.append({"op": "removed", "index": e.index})
        elif isinstance(e, Dropped):
            out.append({"op": "dropped", "count": e.count})
    return out


def events_in(data: list[Mapping[str, Any]]) -> list[Event]:
    events: list[Event] = []
    for item in data:
        op = item.get("op")
        if op == "recorded":
            events.append(Recorded(*segment_in(item["segment"])))
        elif op == "trimmed":
            events.append(Trimmed(int(item["index"]), segment_in(item["segment"])[0]))
        elif op == "removed":
            events.append(Removed(int(item["index"])))
        elif op == "dropped":
            events.append(Dropped(int(item["count"])))
        else:
            raise ProtocolError(Code.BAD_MESSAGE, f"unknown history event {op!r}")
    return events


# --- audio chunks: a JSON header, then its PCM as one binary message ----------------------------

def chunk_header(rid: int | None, chunk: AudioChunk) -> dict[str, Any]:
    return {
        "type": "chunk",
        "re": rid,
        "start_ms": chunk.start_ms,
        "text_start": chunk.text_start,
        "text_end": chunk.text_end,
        "words": [[w.text, w.start_ms] for w in chunk.words],
        "samples": len(chunk.pcm),
        "sample_rate": chunk.sample_rate,
        "codes": encode_codes(chunk.codes),
    }


def chunk_in(header: Mapping[str, Any], data: bytes) -> AudioChunk:
    pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
    words = tuple(Word(text, start) for text, start in header.get("words", []))
    return AudioChunk(
        pcm, header["start_ms"], header["text_start"], header["text_end"], words,
        codes=decode_codes(header.get("codes")), sample_rate=header.get("sample_rate", SAMPLE_RATE),
    )


def dumps(message: Mapping[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))
