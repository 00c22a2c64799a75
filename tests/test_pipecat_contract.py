"""Pipecat's contract for TTS services, point by point (pipecat-ai 1.14).

Each test names the framework behaviour it mirrors: `TTSService.add_word_timestamps` (one
`TTSTextFrame` per word, in time order, within the audio), the official services' `run_tts`
(Piper, Kokoro, Cartesia: `@traced_tts`, every exception becomes an `ErrorFrame`, TTFB metrics
stopped in `finally`), the pipeline's `EndFrame` / `stop()` life cycle (`pipecat.tests.utils.run_test`
ends every run with an EndFrame), and the user aggregator's `LLMContextUserTurnFrame` (one per user
turn, stamped with the turn's start). Offline, on the small random checkpoint.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.tests.utils import run_test  # noqa: E402

from csm_plugin.backend import shared_service  # noqa: E402
from pipecat_csm import CSMTTSService  # noqa: E402


def make_tts(checkpoint, **settings) -> CSMTTSService:
    settings.setdefault("max_audio_ms", 480)
    return CSMTTSService(settings=CSMTTSService.Settings(model=str(checkpoint), **settings))


def voice(seconds: float, rate: int = 16_000, pitch: float = 220.0) -> list[InputAudioRawFrame]:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * pitch * t) * 32767).astype(np.int16).tobytes()
    return [InputAudioRawFrame(pcm[i : i + 640], rate, 1) for i in range(0, len(pcm), 640)]


@pytest.mark.asyncio
async def test_a_capped_reply_times_every_word_inside_its_audio(hf_checkpoint):
    """TTSService.add_word_timestamps: one TTSTextFrame per word, increasing times, and (ours)
    within the audio actually produced, even when the reply is cut short by max_audio_ms."""
    text = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    tts = make_tts(hf_checkpoint, seed=3, max_audio_ms=320)  # 4 frames: far shorter than the text
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text)])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    audio_s = sum(len(f.audio) // 2 / f.sample_rate for f in down if isinstance(f, TTSAudioRawFrame))
    assert audio_s == pytest.approx(0.32)
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [w.text for w in words] == text.split()  # every word its own frame
    pts = [w.pts for w in words]
    assert all(b > a for a, b in zip(pts, pts[1:]))  # strictly increasing
    assert (pts[-1] - pts[0]) / 1e9 < audio_s  # inside the audio produced


class _SlowLoad:
    """The shared service behind a load that takes a while (the pipeline may end meanwhile)."""

    def __init__(self, service, seconds: float):
        self.service, self.seconds = service, seconds

    async def start(self):
        await asyncio.sleep(self.seconds)
        return self.service

    def conversation(self, conversation_id, *, voices=None):
        return self.service.conversation(conversation_id, voices=voices)

    async def close(self):
        pass


@pytest.mark.asyncio
@pytest.mark.slow
async def test_end_frame_while_the_model_loads_ends_the_pipeline(hf_checkpoint):
    """run_test ends with an EndFrame right after the LLM's text, while the model still loads:
    stop() cancels the load, and run_tts must then return (it used to raise the load's
    CancelledError and hang the pipeline); no conversation is left in the shared model."""
    service = await shared_service(hf_checkpoint)
    tts = CSMTTSService(backend=_SlowLoad(service, 2.0), settings=CSMTTSService.Settings(max_audio_ms=160))
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there."), LLMFullResponseEndFrame()]
    await asyncio.wait_for(run_test(tts, frames_to_send=frames), 60)
    await asyncio.sleep(0.2)
    assert tts._conversation_id not in service._conversations


@pytest.mark.asyncio
async def test_text_after_stop_neither_speaks_nor_reopens_the_conversation(hf_checkpoint):
    """After stop() (EndFrame) nothing more is spoken: the closed conversation is not reopened
    and no cache slot is left behind."""
    service = await shared_service(hf_checkpoint)
    tts = CSMTTSService(backend=service, settings=CSMTTSService.Settings(max_audio_ms=160))
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there, this is the end.")]  # no end: flushed at EndFrame
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), 60)
    await asyncio.sleep(0.2)  # any background close has run
    conv_id = tts._conversation_id
    assert conv_id not in service._conversations
    assert not any(s.owner == conv_id for s in service.engine.slots)
    again = [f async for f in tts.run_tts("Anyone?", "ctx-after-stop")]
    assert again == [] and conv_id not in service._conversations


class _FailingConversation:
    def __init__(self, conv):
        self._conv = conv
        self.id = conv.id

    def __getattr__(self, name):
        return getattr(self._conv, name)

    def speak(self, text, options=None, **changes):
        if text.startswith("Break"):
            raise RuntimeError("boom")  # not a CSMError: any bug in the backend
        return self._conv.speak(text, options, **changes)


class _FailingBackend:
    def __init__(self, service):
        self.service = service

    async def start(self):
        return self

    def conversation(self, conversation_id, *, voices=None):
        return _FailingConversation(self.service.conversation(conversation_id, voices=voices))

    async def close(self):
        pass


@pytest.mark.asyncio
@pytest.mark.slow
async def test_any_exception_in_run_tts_is_an_error_frame_and_the_pipeline_goes_on(hf_checkpoint):
    """The official services catch every exception in run_tts as an ErrorFrame (not only the
    plugin's own errors), stop their TTFB metrics, and the next text is spoken."""
    tts = CSMTTSService(backend=_FailingBackend(await shared_service(hf_checkpoint)),
                        settings=CSMTTSService.Settings(max_audio_ms=160, seed=1))
    down, up = await asyncio.wait_for(
        run_test(tts, frames_to_send=[TTSSpeakFrame("Break this."), TTSSpeakFrame("Then speak.")]), 60
    )
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    # ours, once (Pipecat itself adds "context completed with no audio" for that turn)
    assert sum("boom" in e.error for e in errors) == 1, [e.error for e in errors]
    assert [s.text for s in tts.conversation.history] == ["Then speak."]
    assert sum(isinstance(f, TTSAudioRawFrame) for f in down) == 2


@pytest.mark.asyncio
async def test_a_failed_load_does_not_hold_each_turn(tmp_path):
    """After a failed load the service reports it once and every later turn passes at once,
    instead of waiting stop_frame_timeout_s (10 s) per turn for audio that never comes."""
    tts = CSMTTSService(settings=CSMTTSService.Settings(model=str(tmp_path / "missing")))
    frames = [TTSSpeakFrame("Hello."), TTSSpeakFrame("Anyone there?"), TTSSpeakFrame("Hello?")]
    down, up = await asyncio.wait_for(run_test(tts, frames_to_send=frames), 20)  # 3 turns x 10 s before
    assert [f for f in up if isinstance(f, ErrorFrame)]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.asyncio
async def test_user_audio_goes_to_the_turn_it_was_captured_for(hf_checkpoint):
    """LLMContextUserTurnFrame arrives once the transcript is final, possibly after the next
    turn's audio: each turn gets the audio of its own UserStarted/StoppedSpeaking span."""
    tts = make_tts(hf_checkpoint)
    frames = [
        UserStartedSpeakingFrame(), *voice(1.0), UserStoppedSpeakingFrame(),
        UserStartedSpeakingFrame(), *voice(0.5, pitch=330.0), UserStoppedSpeakingFrame(),
        LLMContextUserTurnFrame(text="First turn.", timestamp="t0"),
        LLMContextUserTurnFrame(text="Second turn.", timestamp="t1"),
        TTSSpeakFrame("Okay."),  # a reply waits for the user turns to be recorded
    ]
    await run_test(tts, frames_to_send=frames)
    history = tts.conversation.history
    assert [s.text for s in history[:2]] == ["First turn.", "Second turn."]
    assert history[0].codes is not None and history[1].codes is not None
    assert history[0].codes.shape[0] == 13 and history[1].codes.shape[0] == 7  # 1.0 s and 0.5 s at 12.5 Hz
