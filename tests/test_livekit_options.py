"""The LiveKit plugin's options: styles (the `style` option and "[style]" tags an LLM writes) and
voices (a prompt registered once under a name from its content, or a voice already registered).

What each test mirrors in LiveKit Agents 1.8: the official plugins' `update_options()` (Cartesia,
ElevenLabs: a change applies from the next stream) and their voice option (a provider-side
voice id, as Cartesia's `voice=` / ElevenLabs' `voice_id=`); upstream
tests/test_agent_session.py `test_pipeline_multi_segment_flush` (an llm_node that yields
FlushSentinel: one reply in several TTS streams). The FakeBackend (no model) records what the
adapter asks the backend for; the real service (small random checkpoint) shows the effect.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit.agents import AgentSession, APIConnectOptions, APIError  # noqa: E402
from livekit.plugins import csm  # noqa: E402
from test_livekit_support import (  # noqa: E402
    REPLY_MS,
    SEED,
    CaptureOutput,
    CountingBackend,
    FakeBackend,
    ScriptedLLM,
    SegmentedAgent,
)

from csm_plugin.backend import shared_service  # noqa: E402
from csm_plugin.conversation.clauses import split_text  # noqa: E402
from csm_plugin.conversation.options import SpeakOptions  # noqa: E402
from csm_plugin.conversation.types import check_name  # noqa: E402
from csm_plugin.service import Exemplar  # noqa: E402

SR = 24000
ONE_TRY = APIConnectOptions(max_retry=0)


def tone(seconds: float = 1.0, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def speak_stream(speech, tokens: list[str]) -> None:
    async with speech.stream() as stream:
        for token in tokens:
            stream.push_text(token)
        stream.end_input()
        async for _ in stream:
            pass


# --- styles -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_style_option_goes_with_every_piece_and_update_options_changes_it():
    """update_options() as in the official plugins: the stream created before keeps its style,
    the next one takes the new one; None means no style."""
    backend = FakeBackend()
    speech = csm.TTS(backend=backend, style="calm", follow_session=False)
    stream = speech.stream()
    speech.update_options(style="cheerful")  # after the stream was created
    stream.push_text("Of course, let me check that.")
    stream.end_input()
    async for _ in stream:
        pass
    await stream.aclose()
    await speech.synthesize("All done here.").collect()
    speech.update_options(style=None)
    await speech.synthesize("Anything else?").collect()
    assert [(text, options.style) for text, options in backend.spoken] == [
        ("Of course,", "calm"), ("let me check that.", "calm"), ("All done here.", "cheerful"), ("Anything else?", None),
    ]
    with pytest.raises(ValueError, match="style"):
        speech.update_options(style="not a name!")
    with pytest.raises(ValueError, match="style"):
        csm.TTS(backend=backend, style="[calm]")
    await speech.aclose()


@pytest.mark.asyncio
async def test_a_replys_style_tag_goes_on_every_piece_and_is_reset_for_the_next_reply():
    """StyleTagCarry: "[tag] ..." at the start of a reply styles all its pieces (streamed and
    synthesize()); a piece with its own tag keeps it; the next reply starts without one."""
    backend = FakeBackend()
    speech = csm.TTS(backend=backend, follow_session=False)
    reply = "[comforting] Oh no, I am so sorry. That must be hard."
    await speak_stream(speech, [w if i == 0 else " " + w for i, w in enumerate(reply.split(" "))])
    await speak_stream(speech, ["Sure thing, here it is."])
    await speech.synthesize("[calm] One moment, please wait. [cheerful] Found it!").collect()
    assert [text for text, _ in backend.spoken] == [
        "[comforting] Oh no,", "[comforting] I am so sorry.", "[comforting] That must be hard.",
        "Sure thing,", "here it is.",
        "[calm] One moment,", "[calm] please wait.", "[cheerful] Found it!",
    ]
    # the tag is a directive, not words: the history keeps the text without it
    assert [s.text for s in speech.conversation.history][:3] == ["Oh no,", "I am so sorry.", "That must be hard."]
    await speech.aclose()


@pytest.mark.asyncio
async def test_a_style_tag_carries_across_the_segments_of_one_reply():
    """test_pipeline_multi_segment_flush: one reply, two TTS streams (FlushSentinel); the tag of
    its first segment styles the second too, and the next reply starts without it."""
    backend = FakeBackend()
    speech = csm.TTS(backend=backend)
    agent = SegmentedAgent([["[calm] Your parcel is late.", "It will arrive tomorrow."], ["Anything else today?"]])
    session = AgentSession(llm=ScriptedLLM([]), tts=speech, vad=None, turn_handling={"turn_detection": None})
    session.output.audio = CaptureOutput()
    speech.attach(session)
    await session.start(agent=agent, record=False)
    try:
        await session.generate_reply(user_input="Where is it?").wait_for_playout()
        await session.generate_reply(user_input="Thanks.").wait_for_playout()
        assert [text for text, _ in backend.spoken] == [
            "[calm] Your parcel is late.", "[calm] It will arrive tomorrow.", "Anything else today?",
        ]
    finally:
        await session.aclose()
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_tagged_reply_is_spoken_as_its_clauses_in_that_style(hf_checkpoint):
    """With the real service: every piece of a "[calm] ..." reply is spoken in the registered
    style, exactly as speaking each clause with style="calm" after the ones before; an unknown
    style name in the option is a non-retryable APIError naming it."""
    service = await shared_service(hf_checkpoint)
    await service.add_style("calm", [Exemplar(0, "Take a deep breath.", tone(1.0, 180.0), SR)])
    backend = CountingBackend(service)
    speech = csm.TTS(backend=backend, seed=SEED, max_audio_ms=REPLY_MS, follow_session=False)
    text = "Of course, let me check that for you."
    await speak_stream(speech, ["[calm] " + text])
    clauses = split_text(text, "clause")
    assert [t for t, _ in backend.spoken] == ["[calm] " + clause for clause in clauses]
    history = speech.conversation.history
    assert [s.text for s in history] == clauses

    reference = service.conversation(f"{speech.conversation_id}-reference")
    options = SpeakOptions(speaker=0, seed=SEED, max_audio_ms=REPLY_MS, chunk_frames=1, style="calm")
    for clause in clauses:
        async for _ in reference.speak(clause, options):
            pass
    assert reference.history == history
    await reference.close()

    unknown = csm.TTS(backend=service, style="no-such-style", follow_session=False)
    with pytest.raises(APIError, match="no-such-style") as info:
        await unknown.synthesize("Hello there.", conn_options=ONE_TRY).collect()
    assert not info.value.retryable
    await unknown.aclose()
    await speech.aclose()


def test_bad_split_options_are_refused_when_the_tts_is_made():
    backend = FakeBackend()
    with pytest.raises(ValueError, match="split"):
        csm.TTS(backend=backend, split="word")
    with pytest.raises(ValueError, match="max_words"):
        csm.TTS(backend=backend, clause_min_words=5, clause_max_words=3)
    with pytest.raises(ValueError, match="min_words"):
        csm.TTS(backend=backend, clause_min_words=0)


# --- voices -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_voice_prompt_is_registered_once_under_a_name_from_its_content():
    """Every TTS given the same clip and transcript pins the same registered voice (so the
    service prefills its cache rows once for all their conversations); another clip is another
    voice. It is registered once per backend, however many TTS objects and replies use it."""
    backend = FakeBackend()
    prompt = csm.VoicePrompt("Thanks for calling, this is Maya.", tone(), SR)
    same = csm.VoicePrompt("Thanks for calling, this is Maya.", tone().copy(), SR)
    first = csm.TTS(backend=backend, voice=prompt, follow_session=False)
    second = csm.TTS(backend=backend, voice=same, follow_session=False)
    other = csm.TTS(backend=backend, voice=csm.VoicePrompt("Hi, I am Max.", tone(), SR), follow_session=False)
    louder = csm.TTS(backend=backend, voice=csm.VoicePrompt(prompt.text, 2 * tone(), SR), follow_session=False)
    name = first.voice_name
    assert check_name(name) and name == prompt.name and name.startswith("voice-prompt-")
    assert second.voice_name == name and len({name, other.voice_name, louder.voice_name}) == 3

    for speech in (first, first, second):
        await speech.synthesize("Hello there.").collect()
    assert backend.registered == [name]  # once for both TTS objects
    for speech in (first, second):
        pinned = speech.conversation.turns[0]
        assert pinned.origin == "voice" and pinned.segment.text == prompt.text and pinned.segment.speaker == 0
    assert first.conversation is not second.conversation
    for speech in (first, second, other, louder):
        await speech.aclose()


@pytest.mark.asyncio
async def test_voice_prompts_share_one_registered_voice_on_the_service(hf_checkpoint):
    """With the real service: two TTSs (two conversations) with the same prompt use one
    registered voice, pinned first in both contexts."""
    service = await shared_service(hf_checkpoint)
    prompt = csm.VoicePrompt("Thanks for calling, this is Maya.", tone(), SR)
    speakers = [csm.TTS(backend=service, voice=prompt, seed=SEED, max_audio_ms=REPLY_MS, follow_session=False) for _ in range(2)]
    for speech in speakers:
        await speech.synthesize("Hello there.").collect()
    assert speakers[0].voice_name == speakers[1].voice_name in service.voices
    voice_turns = [speech.conversation.turns[0] for speech in speakers]
    assert all(t.origin == "voice" and t.segment.text == prompt.text for t in voice_turns)
    assert np.array_equal(voice_turns[0].segment.codes, voice_turns[1].segment.codes)
    for speech in speakers:
        await speech.aclose()


@pytest.mark.asyncio
async def test_a_voice_by_name_uses_the_one_registered_on_the_backend(hf_checkpoint):
    """voice="name": a voice the backend already has (a server's voices file); an unknown name is
    a non-retryable APIError naming it; a malformed one is refused at once."""
    service = await shared_service(hf_checkpoint)
    await service.add_voice("maya", text="Thanks for calling, this is Maya.", audio=tone(), sample_rate=SR)
    speech = csm.TTS(backend=service, voice="maya", seed=SEED, max_audio_ms=REPLY_MS, follow_session=False)
    await speech.synthesize("Hello there.").collect()
    pinned = speech.conversation.turns[0]
    assert pinned.origin == "voice" and pinned.segment.text == "Thanks for calling, this is Maya."
    assert speech.voice_name == "maya"
    await speech.aclose()

    missing = csm.TTS(backend=service, voice="nobody-here", follow_session=False)
    with pytest.raises(APIError, match="nobody-here") as info:
        await missing.synthesize("Hello there.", conn_options=ONE_TRY).collect()
    assert not info.value.retryable
    await missing.aclose()
    with pytest.raises(ValueError, match="voice"):
        csm.TTS(backend=service, voice="not a name!")
    with pytest.raises(TypeError, match="VoicePrompt"):
        csm.TTS(backend=service, voice=3)


def test_prewarm_with_a_given_backend_opens_nothing_else():
    """LiveKit's AgentSession calls `tts.prewarm()` when it starts: a TTS given a backend uses
    that one and starts no load of the default model (which would try to download it)."""
    import asyncio

    async def main():
        backend = FakeBackend()
        speech = csm.TTS(backend=backend, follow_session=False)
        speech.prewarm()
        assert speech._backend_task is None  # no model load started in the background
        async for _ in speech.synthesize("Hello there.", conn_options=APIConnectOptions(max_retry=0)):
            pass
        await speech.aclose()
        return backend.spoken

    assert [text for text, _ in asyncio.run(main())] == ["Hello there."]
