"""The agent's voice in CSMTTSService: `voice_prompt=` (a clip and its transcript, registered on the
backend once, under a name derived from its content) or `voice=` (a name registered elsewhere).
Offline, on the small random checkpoint."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame, TTSSpeakFrame  # noqa: E402
from pipecat.tests.utils import run_test  # noqa: E402
from test_pipecat import fresh_codes, reference_engine  # noqa: E402, F401 - fixture

from csm_plugin.backend import shared_service  # noqa: E402
from csm_plugin.errors import AudioError, InputError  # noqa: E402
from pipecat_csm import CSMTTSService, VoicePrompt  # noqa: E402

RATE = 16_000


def clip(seconds: float = 1.0, pitch: float = 180.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * pitch * t) * 32767).astype(np.int16)


PROMPT = VoicePrompt("Thanks for calling, this is Maya.", clip(), RATE)


class CountingBackend:
    """The shared service, counting the voices registered on it."""

    def __init__(self, service):
        self.service, self.added = service, []

    async def start(self):
        return self

    async def add_voice(self, name, *, text, audio, sample_rate):
        self.added.append(name)
        return await self.service.add_voice(name, text=text, audio=audio, sample_rate=sample_rate)

    def conversation(self, conversation_id, *, voices=None):
        return self.service.conversation(conversation_id, voices=voices)

    async def close(self):
        pass


class NoVoicesBackend(CountingBackend):
    """A backend clients cannot register voices on (as a csm-plugin server)."""

    add_voice = None  # type: ignore[assignment]

    def __getattribute__(self, name):
        if name == "add_voice":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_a_prompt_is_named_by_its_content():
    same = VoicePrompt(PROMPT.text, clip().copy(), RATE)
    as_float = VoicePrompt(PROMPT.text, clip().astype(np.float32) / 32768, RATE)  # the same samples
    assert PROMPT.name == same.name == as_float.name
    assert PROMPT.name.startswith("voice-prompt-")
    assert VoicePrompt("Thanks for calling, this is Sam.", clip(), RATE).name != PROMPT.name
    assert VoicePrompt(PROMPT.text, clip(pitch=200.0), RATE).name != PROMPT.name
    assert VoicePrompt(PROMPT.text, clip(rate=8000), 8000).name != PROMPT.name
    assert VoicePrompt.of((PROMPT.text, clip(), RATE)).name == PROMPT.name


def test_a_bad_prompt_is_refused_when_given():
    with pytest.raises(InputError, match="empty"):
        VoicePrompt("  ", clip(), RATE)
    with pytest.raises(AudioError, match="shorter than one 80 ms frame"):
        VoicePrompt("Hi.", clip(0.05), RATE)
    with pytest.raises(AudioError, match="mono"):
        VoicePrompt("Hi.", np.stack([clip(), clip()]), RATE)
    with pytest.raises(AudioError, match="sample_rate"):
        VoicePrompt("Hi.", clip(), 0)
    with pytest.raises(InputError, match="VoicePrompt or a"):
        CSMTTSService(voice_prompt=("Hi.", clip()))
    with pytest.raises(InputError, match="not both"):
        CSMTTSService(voice_prompt=PROMPT, settings=CSMTTSService.Settings(voice="agent"))


@pytest.mark.asyncio
async def test_a_voice_prompt_is_registered_once_and_conditions_every_reply(hf_checkpoint, reference_engine):  # noqa: F811
    backend = CountingBackend(await shared_service(hf_checkpoint))
    a = CSMTTSService(backend=backend, voice_prompt=PROMPT, settings=CSMTTSService.Settings(max_audio_ms=240, seed=3))
    b = CSMTTSService(backend=backend, voice_prompt=(PROMPT.text, clip(), RATE), settings=CSMTTSService.Settings(max_audio_ms=240))
    conv_a, conv_b = await asyncio.gather(a.wait_ready(), b.wait_ready())  # pipelines starting together
    assert backend.added == [PROMPT.name]  # one registration for both
    c = CSMTTSService(backend=backend, voice_prompt=PROMPT)  # and one started later
    await (await c.wait_ready()).close()
    assert backend.added == [PROMPT.name]
    for conv in (conv_a, conv_b):  # pinned as the agent's speaker at the start of each conversation
        voice = conv.history[0]
        assert (voice.speaker, voice.text) == (0, PROMPT.text) and voice.codes.shape[0] == 13  # 1 s at 12.5 Hz
    await conv_b.close()  # (a's pipeline closes its own)

    down, up = await run_test(a, frames_to_send=[TTSSpeakFrame("How can I help?")])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    reply = a.conversation.history[-1]
    assert reply.text == "How can I help?"
    # the reply is what a fresh prefill of [voice prompt] gives: the prompt conditioned it
    assert np.array_equal(reply.codes, fresh_codes(reference_engine, a.conversation.history[:1], reply.text, seed=3, max_audio_ms=240))
    assert not np.array_equal(reply.codes, fresh_codes(reference_engine, [], reply.text, seed=3, max_audio_ms=240))


@pytest.mark.asyncio
async def test_a_backend_without_voices_gets_the_prompt_as_the_first_turn(hf_checkpoint):
    backend = NoVoicesBackend(await shared_service(hf_checkpoint))
    tts = CSMTTSService(backend=backend, voice_prompt=PROMPT, settings=CSMTTSService.Settings(max_audio_ms=160))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello.")])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    history = tts.conversation.history
    assert [(s.speaker, s.text) for s in history] == [(0, PROMPT.text), (0, "Hello.")]
    assert history[0].codes.shape[0] == 13
    assert [t.origin for t in tts.conversation.turns][:1] == ["user"]  # a turn, not a pinned voice


@pytest.mark.asyncio
async def test_a_voice_named_on_the_backend_is_pinned(hf_checkpoint):
    service = await shared_service(hf_checkpoint)
    await service.add_voice("maya", text=PROMPT.text, audio=clip(), sample_rate=RATE)
    tts = CSMTTSService(backend=service, settings=CSMTTSService.Settings(voice="maya", max_audio_ms=160))
    conv = await tts.wait_ready()
    assert conv.history[0].text == PROMPT.text
    await conv.close()
    # an unknown name fails the load once, as an ErrorFrame, and no turn waits on it
    bad = CSMTTSService(backend=service, settings=CSMTTSService.Settings(voice="nobody", max_audio_ms=160))
    down, up = await run_test(bad, frames_to_send=[TTSSpeakFrame("Hello.")])
    assert any("unknown voice 'nobody'" in f.error for f in up if isinstance(f, ErrorFrame))
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.asyncio
async def test_a_prompt_the_backend_refuses_is_one_error(hf_checkpoint):
    class Refusing(CountingBackend):
        async def add_voice(self, name, **kwargs):
            raise AudioError("the backend says no")

    tts = CSMTTSService(backend=Refusing(await shared_service(hf_checkpoint)), voice_prompt=PROMPT)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello."), TTSSpeakFrame("Again.")])
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert errors == ["CSM TTS could not register its voice prompt: AudioError: the backend says no"]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)] and not tts.is_usable
