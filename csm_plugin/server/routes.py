"""HTTP endpoints: health, readiness, metrics, server info, and one reply as a WAV file."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import time
import wave

import numpy as np
from aiohttp import web

from ..conversation.protocol import (
    PROTOCOL_VERSION,
    Code,
    ProtocolError,
    SegmentIn,
    SpeechRequest,
    decode_audio,
    decode_codes,
    describe_validation_error,
    error_code,
    parse_json,
)
from ..conversation.types import FRAME_MS, SAMPLE_RATE, Segment
from ..engine import max_frames_for_text
from ..errors import CSMError
from .app import STATE, ServerState
from .auth import Principal, client_address
from .sessions import add_turn, worker_alive

log = logging.getLogger(__name__)

_STATUS = {
    Code.UNAUTHORIZED: 401,
    Code.TOO_MANY_AUTH_FAILURES: 429,  # with Retry-After
    Code.MESSAGE_TOO_BIG: 413,
    Code.TOO_MANY_CONVERSATIONS: 429,
    Code.TOO_MANY_STREAMS: 429,
    Code.TOO_MANY_CONNECTIONS: 503,
    Code.BUSY: 503,  # with Retry-After
    Code.DRAINING: 503,
    Code.NOT_READY: 503,
    Code.ENGINE_ERROR: 500,
    Code.INTERNAL: 500,
}


def error_response(code: str, message: str, status: int | None = None, retry_after_s: float | None = None) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="csm"'} if code == Code.UNAUTHORIZED else {}
    error = {"code": code, "message": message}
    if retry_after_s is not None:
        error["retry_after_s"] = retry_after_s
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    return web.json_response({"error": error}, status=status or _STATUS.get(code, 400), headers=headers or None)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure becomes a JSON error body with a stable code; nothing leaks a traceback."""
    state = request.app[STATE]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except ProtocolError as e:
        response = error_response(e.code, e.message, retry_after_s=getattr(e, "retry_after_s", None))
    except web.HTTPRequestEntityTooLarge:
        response = error_response(Code.MESSAGE_TOO_BIG, f"the request body is over {state.limits.max_message_bytes} bytes")
    except web.HTTPException as e:
        if e.status >= 400 and not e.text.startswith("{"):
            response = error_response(Code.BAD_MESSAGE if e.status < 500 else Code.INTERNAL, e.reason, e.status)
        else:
            raise
    except CSMError as e:
        response = error_response(error_code(e), str(e))
    except Exception:
        log.exception("request to %s failed", endpoint)
        response = error_response(Code.INTERNAL, "internal server error")
    if response.status >= 400 and isinstance(response, web.Response) and response.content_type == "application/json":
        with contextlib.suppress(Exception):
            state.metrics.errors.labels(json.loads(response.body)["error"]["code"]).inc()
    if not isinstance(response, web.WebSocketResponse):
        state.metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


def authenticate(request: web.Request) -> Principal:
    """The request's principal. An address that failed too often lately is refused (429) without
    its key being looked at, so that keys cannot be guessed at speed."""
    state = request.app[STATE]
    if not state.keys.require:
        return state.keys.authenticate(None)
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"), state.trusted_proxies)
    wait = state.auth_throttle.retry_after_s(address)
    if wait is not None:
        error = ProtocolError(Code.TOO_MANY_AUTH_FAILURES, "too many failed authentications from this address; try later")
        error.retry_after_s = round(wait)
        raise error
    principal = state.keys.authenticate(request.headers.get("Authorization"))
    if principal is None:
        state.auth_throttle.failed(address)
        raise ProtocolError(Code.UNAUTHORIZED, "missing or invalid API key: send 'Authorization: Bearer <key>'")
    return principal


def check_ready(state: ServerState) -> None:
    if state.draining:
        raise ProtocolError(Code.DRAINING, "the server is shutting down; reconnect (another replica will take over)")
    if not state.ready:
        raise ProtocolError(Code.NOT_READY, "the model is still loading" if state.load_error is None else "the model failed to load")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP and the inference worker has not died."""
    state = request.app[STATE]
    if state.load_error is not None or (state.ready and not worker_alive(state.service)):
        return web.json_response({"ok": False, "error": str(state.load_error or "the inference worker stopped")}, status=500)
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the model is loaded and warmed up, and the server is not draining."""
    state = request.app[STATE]
    ready = state.ready and not state.draining and worker_alive(state.service)
    body = {"ready": ready, "draining": state.draining, "active_streams": state.active_streams}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.config.metrics_require_auth:
        authenticate(request)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type})


async def info(request: web.Request) -> web.Response:
    """What a client may send: limits, voices, styles, audio format (needs a key; never names the model)."""
    authenticate(request)
    state = request.app[STATE]
    check_ready(state)
    return web.json_response(
        {
            "protocol": PROTOCOL_VERSION,
            "sample_rate": SAMPLE_RATE,
            "frame_ms": FRAME_MS,
            "voices": sorted(state.voice_names),
            "styles": sorted(state.style_names),
            "limits": state.limits.model_dump(),
        }
    )


def check_text(state: ServerState, text: str, what: str = "text") -> None:
    if len(text) > state.limits.max_text_chars:
        raise ProtocolError(Code.TEXT_TOO_LONG, f"{what} is {len(text)} characters, at most {state.limits.max_text_chars}")


def check_voice(state: ServerState, voice: object) -> None:
    """A request's `voice`: None, or the name of a voice the operator registered (see /v1/info)."""
    if voice is None:
        return
    if not isinstance(voice, str):
        raise ProtocolError(Code.BAD_MESSAGE, f"voice: expected the name of a voice (a string), got {type(voice).__name__}")
    if voice not in state.voice_names:
        raise ProtocolError(Code.UNKNOWN_VOICE, f"unknown voice {voice[:80]!r}; {_registered('voices', state.voice_names)}")


def check_style(state: ServerState, style: str | None) -> None:
    """A request's `style` (already a valid name): None, or a style the operator registered."""
    if style is not None and style not in state.style_names:
        raise ProtocolError(Code.UNKNOWN_STYLE, f"unknown style {style!r}; {_registered('styles', state.style_names)}")


def _registered(what: str, names: set[str]) -> str:
    return f"this server has {what} {sorted(names)}" if names else f"this server has no {what} (serve --voices FILE adds them)"


def reply_ms(state: ServerState, text: str, requested: float | None) -> float:
    """The reply's audio cap: what was asked (or the text-length default), at most max_reply_ms."""
    default = max_frames_for_text(text) * FRAME_MS
    return min(requested if requested is not None else default, state.limits.max_reply_ms)


def segment_from_wire(state: ServerState, item: SegmentIn, allow_audio: bool) -> tuple[Segment, str, tuple | None]:
    """A wire segment -> (Segment without audio codes yet, origin, (samples, rate) to encode or None)."""
    check_text(state, item.text, "a segment's text")
    if item.codes is not None and item.audio is not None:
        raise ProtocolError(Code.BAD_MESSAGE, "a segment carries codes or audio, not both")
    if item.audio is not None and not allow_audio:
        raise ProtocolError(Code.BAD_MESSAGE, "this message carries segments with codes, not audio")
    max_frames = int(state.limits.max_audio_seconds * 1000 // FRAME_MS) + 1
    codes = decode_codes(item.codes, max_frames, state.service.engine.checkpoint.config.audio_vocab_size)
    audio = decode_audio(item.audio, state.limits.max_audio_seconds) if item.audio is not None else None
    return Segment(item.speaker, item.text, codes), item.origin, audio


async def speech(request: web.Request) -> web.Response:
    """POST /v1/speech: JSON SpeechRequest in, a 24 kHz 16-bit mono WAV out."""
    principal = authenticate(request)
    state = request.app[STATE]
    check_ready(state)
    body = parse_json(await request.read())  # bad_message for bad JSON, deep nesting, lone surrogates
    voice = None
    if isinstance(body, dict) and "voice" in body:  # the reply's voice: a request field, not a speak option
        body = dict(body)
        voice = body.pop("voice")
    try:
        req = SpeechRequest.model_validate(body)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError
        message = describe_validation_error(e) if hasattr(e, "errors") else str(e)
        raise ProtocolError(Code.BAD_MESSAGE, message) from None
    check_text(state, req.text)
    check_voice(state, voice)
    check_style(state, req.options.style)
    if len(req.context) > state.limits.max_history_segments:
        raise ProtocolError(Code.HISTORY_TOO_LONG, f"at most {state.limits.max_history_segments} context segments")
    context = [segment_from_wire(state, item, allow_audio=True) for item in req.context]

    start = time.perf_counter()
    place = await state.admission.acquire(principal.key_id)  # Busy: 503 with Retry-After
    state.metrics.queue_wait.observe(time.perf_counter() - start)
    voices = {req.options.speaker: voice} if voice is not None else None  # pinned for the reply's speaker
    conv = state.service.conversation(f"{principal.key_id}/\x00http-{secrets.token_hex(8)}", voices=voices)
    state.stream_started(principal.key_id)
    outcome = "error"
    try:
        for segment, origin, audio in context:
            await add_turn(conv, segment, origin, audio)
        pcm = []
        async for chunk in conv.speak(req.text, req.options, max_audio_ms=reply_ms(state, req.text, req.options.max_audio_ms)):
            if not pcm:
                state.metrics.time_to_first_audio.observe(time.perf_counter() - start)
            pcm.append(chunk.pcm)
        outcome = "completed"
    finally:
        state.admission.release(place)
        state.stream_ended(principal.key_id)
        state.metrics.streams.labels(outcome).inc()
        with contextlib.suppress(Exception):
            await conv.close()
    samples = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
    if len(samples):
        state.metrics.audio_seconds.inc(len(samples) / SAMPLE_RATE)
        state.metrics.real_time_factor.observe((time.perf_counter() - start) / (len(samples) / SAMPLE_RATE))
    return web.Response(
        body=wav_bytes(samples),
        content_type="audio/wav",
        headers={"X-CSM-Frames": str(len(samples) * 1000 // (SAMPLE_RATE * FRAME_MS))},
    )


def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buffer.getvalue()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if app[STATE].config.metrics_port is None:  # else on its own port (app.py)
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/info", info)
    app.router.add_post("/v1/speech", speech)
