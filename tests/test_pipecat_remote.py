"""CSMTTSService with `url=`: the same pipeline behaviour through csm_plugin.client.RemoteBackend
and an in-process csm-plugin server on loopback."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pipecat")
pytest.importorskip("aiohttp")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import run_test  # noqa: E402
from test_pipecat import fresh_codes, reference_engine, user_voice  # noqa: E402, F401 - fixture
from test_server_support import KEY, running_server  # noqa: E402

from csm_plugin.client import RemoteBackend  # noqa: E402
from pipecat_csm import CSMTTSService  # noqa: E402


class HistoryAtStop(FrameProcessor):
    """Copies the conversation's history at each TTSStoppedFrame (closing it at the end of the
    pipeline forgets a remote conversation)."""

    def __init__(self, tts):
        super().__init__()
        self.tts, self.history = tts, []

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSStoppedFrame):
            self.history = list(self.tts.conversation.history)
        await self.push_frame(frame, direction)


@pytest.mark.asyncio
async def test_remote_two_turns_at_phone_rate(hf_checkpoint, reference_engine):  # noqa: F811
    async with running_server(hf_checkpoint) as (url, _state):
        tts = CSMTTSService(url=url, api_key=KEY, settings=CSMTTSService.Settings(seed=10, max_audio_ms=640))
        voice = user_voice()
        first, second = "I am sorry to hear that.", "Let me check the order for you."
        frames = [
            UserStartedSpeakingFrame(),
            *[InputAudioRawFrame(voice[i : i + 640], 16_000, 1) for i in range(0, len(voice), 640)],
            UserStoppedSpeakingFrame(),
            LLMContextUserTurnFrame(text="Hi, my parcel never arrived.", timestamp="t0"),
            LLMFullResponseStartFrame(),
            LLMTextFrame(first),
            LLMFullResponseEndFrame(),
            LLMContextUserTurnFrame(text="It was a blue jacket.", timestamp="t1"),
            LLMFullResponseStartFrame(),
            LLMTextFrame(second),
            LLMFullResponseEndFrame(),
        ]
        snapshot = HistoryAtStop(tts)
        down, up = await run_test(Pipeline([tts, snapshot]), frames_to_send=frames, pipeline_params=PipelineParams(audio_out_sample_rate=8000))
    assert isinstance(tts._backend, RemoteBackend)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    names = [type(f).__name__ for f in down]
    assert names.count("TTSStartedFrame") == names.count("TTSStoppedFrame") == 2
    assert names.index("TTSStartedFrame") < names.index("TTSAudioRawFrame") < names.index("TTSStoppedFrame")
    history = snapshot.history
    assert [(s.speaker, s.text) for s in history] == [
        (1, "Hi, my parcel never arrived."),
        (0, first),
        (1, "It was a blue jacket."),
        (0, second),
    ]
    assert history[0].codes.shape == (13, 32)
    # The server conditioned each reply on the whole conversation, as the local engine would.
    assert np.array_equal(history[1].codes, fresh_codes(reference_engine, history[:1], first, seed=10))
    assert np.array_equal(history[3].codes, fresh_codes(reference_engine, history[:3], second, seed=11))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    frames_out = history[1].codes.shape[0] + history[3].codes.shape[0]
    assert {f.sample_rate for f in audio} == {8000} and sum(len(f.audio) for f in audio) == 2 * 640 * frames_out
    assert len([f for f in down if isinstance(f, (TTSStartedFrame, TTSStoppedFrame))]) == 4


@pytest.mark.asyncio
async def test_remote_clauses_and_a_voice_prompt(hf_checkpoint, reference_engine):  # noqa: F811
    """Through a server: clauses are consecutive replies there too, and a voice prompt (a server
    takes no voices from clients) becomes the conversation's first turn."""
    from pipecat_csm import VoicePrompt

    rate = 16_000
    t = np.arange(rate) / rate
    prompt = VoicePrompt("Thanks for calling, this is Maya.", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate)
    async with running_server(hf_checkpoint) as (url, _state):
        tts = CSMTTSService(url=url, api_key=KEY, voice_prompt=prompt, settings=CSMTTSService.Settings(seed=20, max_audio_ms=320))
        snapshot = HistoryAtStop(tts)
        frames = [LLMFullResponseStartFrame(), LLMTextFrame("Of course, I can help."), LLMFullResponseEndFrame()]
        down, up = await run_test(Pipeline([tts, snapshot]), frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    history = snapshot.history
    assert [(s.speaker, s.text) for s in history] == [(0, prompt.text), (0, "Of course,"), (0, "I can help.")]
    assert history[0].codes.shape == (13, 32)
    assert np.array_equal(history[1].codes, fresh_codes(reference_engine, history[:1], "Of course,", seed=20, max_audio_ms=320))
    assert np.array_equal(history[2].codes, fresh_codes(reference_engine, history[:2], "I can help.", seed=21, max_audio_ms=320))
    names = [type(f).__name__ for f in down]
    assert names.count("TTSStartedFrame") == names.count("TTSStoppedFrame") == 1
