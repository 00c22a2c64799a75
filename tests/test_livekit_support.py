"""Helpers for the LiveKit plugin tests (no tests here): backends that observe or stand in for the
service, a scripted LLM, an audio output that reports playback the way LiveKit's sinks do, and
an agent whose LLM node splits its reply into segments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, Agent, FlushSentinel, llm, tts  # noqa: E402
from livekit.agents.voice import io  # noqa: E402

from csm_plugin.conversation.history import History, HistoryView  # noqa: E402
from csm_plugin.conversation.options import SpeakOptions  # noqa: E402
from csm_plugin.conversation.styles import split_style_tag  # noqa: E402
from csm_plugin.conversation.types import AudioChunk, Segment, check_name  # noqa: E402
from csm_plugin.errors import InputError  # noqa: E402

SR = 24000
FRAME = SR * 80 // 1000  # samples in one CSM frame
REPLY_MS = 480  # 6 frames per piece
SEED = 7


def frames_of(segment) -> int:
    return 0 if segment.codes is None else segment.codes.shape[0]


async def wait_until(predicate, what: str, steps: int = 600) -> None:
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


# --- backends -----------------------------------------------------------------------------------


class CountingBackend:
    """The real service, observed: counts the chunks its replies have produced so far and keeps
    each speak call's text and options. fail_first: that many speak calls fail with bad input
    (a non-retryable error), as a broken model would."""

    def __init__(self, service, *, fail_first: int = 0):
        self.service = service
        self.yielded = 0
        self.spoken: list[tuple[str, SpeakOptions]] = []
        self.fail_first = fail_first

    async def start(self):
        return self

    def conversation(self, conversation_id, *, voices=None):
        return _CountingConversation(self, self.service.conversation(conversation_id, voices=voices))

    async def close(self):
        pass


class _CountingConversation:
    def __init__(self, backend, conv):
        self._backend, self._conv = backend, conv
        self.id = conv.id

    def __getattr__(self, name):
        return getattr(self._conv, name)

    async def speak(self, text, options=None, **kw):
        self._backend.spoken.append((text, options))
        if self._backend.fail_first > 0:
            self._backend.fail_first -= 1
            raise InputError("the model refused this text (a test failure)")
        gen = self._conv.speak(text, options, **kw)
        try:
            async for chunk in gen:
                self._backend.yielded += 1
                yield chunk
        finally:
            await gen.aclose()


class FakeBackend:
    """A SpeechBackend without a model: each reply is `frames` silent frames with made-up codes,
    recorded by the project's own History (so recording and trimming follow the service's
    rules). Keeps every speak call (text as sent, options) and every voice registered. Like the
    service, a leading "[style]" tag is never spoken: the history keeps the text without it."""

    def __init__(self, *, frames: int = 3):
        self.frames = frames
        self.spoken: list[tuple[str, SpeakOptions]] = []
        self.registered: list[str] = []
        self.voices: dict[str, Segment] = {}
        self.conversations: dict[str, FakeConversation] = {}

    async def start(self):
        return self

    async def add_voice(self, name, *, text, audio, sample_rate):
        check_name(name, "voice")
        self.registered.append(name)
        self.voices[name] = Segment(0, text, np.zeros((12, 32), dtype=np.uint16))

    def conversation(self, conversation_id, *, voices=None):
        if conversation_id not in self.conversations:
            pinned = []
            for speaker, name in (voices or {}).items():
                if name not in self.voices:
                    raise InputError(f"unknown voice {name!r}")
                pinned.append(Segment(speaker, self.voices[name].text, self.voices[name].codes))
            self.conversations[conversation_id] = FakeConversation(self, conversation_id, pinned)
        return self.conversations[conversation_id]

    async def close(self):
        pass


class FakeConversation(HistoryView):
    def __init__(self, backend: FakeBackend, conversation_id: str, voices: list[Segment]):
        self.backend, self.id = backend, conversation_id
        self._history = History(voices)
        self.speaking = False

    async def add_segment(self, speaker, text, audio=None, sample_rate=None):
        return self._history.record(Segment(speaker, text, None), "user")

    async def speak(self, text, options=None, **changes):
        options = SpeakOptions.build(options, **changes)
        self.backend.spoken.append((text, options))
        _tag, untagged = split_style_tag(text)
        delivered, complete = [], False
        self.speaking = True
        try:
            for i in range(self.backend.frames):
                await asyncio.sleep(0)
                codes = np.full((1, 32), len(self._history) * 16 + i, dtype=np.uint16)
                delivered.append(codes[0])
                yield AudioChunk(np.zeros(FRAME, dtype=np.int16), i * 80.0, 0, len(text), (), codes=codes)
            complete = True
        finally:
            self.speaking = False
            if delivered:
                self._history.record_reply(options.speaker, untagged.strip(), np.stack(delivered), complete=complete)

    async def interrupt(self, played_ms=None, *, replies=1):
        return [] if played_ms is None else self._history.trim_heard(played_ms, replies)

    async def close(self):
        pass


# --- LiveKit stand-ins ----------------------------------------------------------------------------


class ScriptedLLM(llm.LLM):
    """Replies with the next scripted text, a word at a time."""

    def __init__(self, replies: list[str]):
        super().__init__()
        self.replies = list(replies)

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **kw):
        return _ScriptedStream(self, self.replies.pop(0), chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    def __init__(self, owner, reply, **kw):
        super().__init__(owner, **kw)
        self._reply = reply

    async def _run(self) -> None:
        for i, word in enumerate(self._reply.split(" ")):
            await asyncio.sleep(0)
            token = word if i == 0 else " " + word
            self._event_ch.send_nowait(llm.ChatChunk(id="r", delta=llm.ChoiceDelta(role="assistant", content=token)))


class SegmentedAgent(Agent):
    """An agent whose LLM node answers each turn with the next scripted reply, a list of segments
    separated by FlushSentinel (as LiveKit's tests/test_agent_session.py FlushMultiSegmentAgent
    does): each segment is its own TTS stream and its own playback."""

    def __init__(self, replies: list[list[str]]):
        super().__init__(instructions="x")
        self.replies = list(replies)

    async def llm_node(self, chat_ctx, tools, model_settings) -> AsyncIterable[str | FlushSentinel]:
        segments = self.replies.pop(0)
        for i, segment in enumerate(segments):
            if i:
                yield FlushSentinel()
            for j, word in enumerate(segment.split(" ")):
                await asyncio.sleep(0)
                yield word if j == 0 else " " + word


class CaptureOutput(io.AudioOutput):
    """An audio sink that 'plays' each segment instantly when it ends, unless `hold` is set: then
    the segment keeps playing until clear_buffer (an interruption), which reports that only
    `played_fraction` of what the sink received was played."""

    def __init__(self, played_fraction: float = 0.5):
        super().__init__(label="capture", capabilities=io.AudioOutputCapabilities(pause=False), sample_rate=None)
        self.frames: list[rtc.AudioFrame] = []
        self.played_fraction = played_fraction
        self.hold = False
        self.reported: list[io.PlaybackFinishedEvent] = []
        self._segment = 0.0
        self._open = False
        self.on("playback_finished", self.reported.append)

    @property
    def duration(self) -> float:
        return sum(f.duration for f in self.frames)

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._open:
            self._open = True
            self.on_playback_started(created_at=0.0)
        self.frames.append(frame)
        self._segment += frame.duration

    def flush(self) -> None:
        super().flush()
        if self._open and not self.hold:
            self.on_playback_finished(playback_position=self._segment, interrupted=False)
            self._segment, self._open = 0.0, False

    def clear_buffer(self) -> None:
        if self._open:
            self.on_playback_finished(playback_position=self._segment * self.played_fraction, interrupted=True)
            self._segment, self._open = 0.0, False


class ToneTTS(tts.TTS):
    """A trivial second TTS for the fallback tests."""

    def __init__(self):
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=SR, num_channels=1)

    def synthesize(self, text, *, conn_options=DEFAULT_API_CONNECT_OPTIONS):
        return _ToneStream(tts=self, input_text=text, conn_options=conn_options)


class _ToneStream(tts.ChunkedStream):
    async def _run(self, output_emitter):
        output_emitter.initialize(request_id="tone", sample_rate=SR, num_channels=1, mime_type="audio/pcm")
        t = np.arange(SR // 4) / SR
        output_emitter.push((3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes())
