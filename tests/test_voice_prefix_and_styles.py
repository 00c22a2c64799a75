"""Shared voice prefixes and styles: both are exact rearrangements of the context.

- A new conversation that pins a voice copies the voice's cache rows, prefilled once per service;
  its cache and its replies equal a fresh prefill, whatever happened to the slots meanwhile.
- A styled reply equals an unstyled reply whose context holds the style's exemplars right before
  it; the history never records them, and the cache equals a fresh prefill of the history after.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from csm_plugin.engine import Engine
from csm_plugin.errors import AudioError, InputError
from csm_plugin.service import CSMService, Exemplar

from test_service import fresh_codes, voice_audio

REPLY_MS = 480


@pytest.fixture(scope="module")
def reference_engine(hf_checkpoint):
    return Engine.load(hf_checkpoint)


async def speak_codes(conv, text, seed, **kw) -> np.ndarray:
    chunks = [c async for c in conv.speak(text, seed=seed, max_audio_ms=REPLY_MS, **kw)]
    return np.concatenate([c.codes for c in chunks])


async def cache_rows(service: CSMService, conversation_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the conversation's slot holds (read on the inference thread)."""

    def read(engine: Engine):
        slot = engine.slot_for(conversation_id)
        return engine.generator.model.backbone_cache.read_rows(slot, engine.slots[slot].end)

    return await service._submit(read)


def fresh_rows(engine: Engine, history) -> tuple[torch.Tensor, torch.Tensor]:
    owner = object()
    slot = engine.prefill_context(owner, [(object(), s) for s in history])
    rows = engine.generator.model.backbone_cache.read_rows(slot, engine.slots[slot].end)
    engine.release(owner)
    return rows


def assert_rows_equal(a, b):
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compile", [False, "graphs"], ids=["eager", "graphs"])
def test_a_new_conversation_copies_the_shared_voice_rows(hf_checkpoint, reference_engine, compile):
    """Also with fixed shapes and GraphedSteps (compile="graphs"): the copies land in place, where
    the graphs read the cache."""
    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=2, compile=compile) as service:
            await service.add_voice("agent", text="This is how I sound.", audio=voice_audio(1.0, seed=1), sample_rate=16_000)
            store = service.engine.prefixes
            first = service.conversation("first", voices={0: "agent"})
            await speak_codes(first, "Hello there.", seed=1)
            assert (len(store), store.hits) == (1, 0)  # prefilled once, kept
            stored = next(iter(store._prefixes.values()))
            kept = (stored.k.clone(), stored.v.clone())
            # Other conversations overwrite and evict every slot, and the first one is trimmed.
            for i in range(3):
                other = service.conversation(f"other{i}")
                await other.add_segment(1, f"Something else entirely, number {i}.")
                await speak_codes(other, "Right.", seed=i)
            await first.interrupt(played_ms=80)
            second = service.conversation("second", voices={0: "agent"})
            await second.add_segment(1, "Can you help me?")
            codes = await speak_codes(second, "Of course I can.", seed=2)
            assert store.hits >= 1  # copied, not prefilled again
            assert_rows_equal((stored.k, stored.v), kept)  # the stored rows never changed
            return codes, second.history, await cache_rows(service, "second")

    codes, history, rows = asyncio.run(main())
    assert np.array_equal(codes, fresh_codes(reference_engine, history[:-1], 0, "Of course I can.", 2, REPLY_MS))
    assert_rows_equal(rows, fresh_rows(reference_engine, history))


def test_voice_prefixes_are_shared_only_for_the_same_voice_and_speaker(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            await service.add_voice("a", text="This is how I sound.", audio=voice_audio(1.0, seed=1), sample_rate=16_000)
            again = await service.add_voice("a", text="This is how I sound.", audio=voice_audio(1.0, seed=1), sample_rate=16_000)
            other = np.random.default_rng(2).uniform(-0.5, 0.5, 16_000).astype(np.float32)
            b = await service.add_voice("b", text="This is how I sound.", audio=other, sample_rate=16_000)
            assert not np.array_equal(b.codes, again.codes)
            assert service._voices["a"] is again  # same content: the same voice (its rows stay shared)
            out = {}
            for name, voices in [("a0", {0: "a"}), ("b0", {0: "b"}), ("a1", {1: "a"}), ("a0-again", {0: "a"})]:
                conv = service.conversation(name, voices=voices)
                out[name] = (await speak_codes(conv, "Hello there.", seed=3), conv.history)
            return out, list(service.engine.prefixes._prefixes.values())

    out, stored = asyncio.run(main())
    assert len(stored) == 3  # a for speaker 0, b for speaker 0, a for speaker 1
    assert all(not torch.equal(x.k, y.k) for i, x in enumerate(stored) for y in stored[i + 1 :])
    assert np.array_equal(out["a0"][0], out["a0-again"][0])
    assert not np.array_equal(out["a0"][0], out["b0"][0])  # another voice's audio changes the reply
    for codes, history in out.values():
        assert np.array_equal(codes, fresh_codes(reference_engine, history[:-1], 0, "Hello there.", 3, REPLY_MS))


CALM = [Exemplar(1, "Take a deep breath, it is fine.", voice_audio(0.6, seed=5), 16_000)]


def test_a_styled_reply_equals_the_exemplar_in_context_and_leaves_no_trace(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            style = await service.add_style("calm", CALM)
            styled, by_hand, plain, tagged = (service.conversation(n) for n in ("styled", "by-hand", "plain", "tagged"))
            for conv in (styled, by_hand, plain, tagged):
                await conv.add_segment(1, "My flight got cancelled.")
            exemplar = style.segments[0]
            await by_hand.add_segment(exemplar.speaker, exemplar.text, codes=exemplar.codes)
            out = {
                "styled": await speak_codes(styled, "I am so sorry.", seed=4, style="calm"),
                "by-hand": await speak_codes(by_hand, "I am so sorry.", seed=4),
                "plain": await speak_codes(plain, "I am so sorry.", seed=4),
            }
            chunks = [c async for c in tagged.speak("[calm] I am so sorry.", seed=4, max_audio_ms=REPLY_MS)]
            out["tagged"] = np.concatenate([c.codes for c in chunks])
            words = [w.text for c in chunks for w in c.words]
            history_after = styled.history
            rows_after = await cache_rows(service, "styled")  # the exemplar's rows are gone at once
            # the next, unstyled reply: conditioned on the history alone
            await styled.add_segment(1, "What now?")
            out["next"] = await speak_codes(styled, "We rebook you.", seed=5)
            return out, words, tagged.history, history_after, rows_after, styled.history, await cache_rows(service, "styled")

    out, words, tagged_history, history_after, rows_after, history, rows = asyncio.run(main())
    assert np.array_equal(out["styled"], out["by-hand"])  # the mechanism is exact
    assert not np.array_equal(out["styled"], out["plain"])  # and the style changes the reply
    assert np.array_equal(out["tagged"], out["styled"])
    assert words == ["I", "am", "so", "sorry."] and tagged_history[-1].text == "I am so sorry."
    assert [s.text for s in history_after] == ["My flight got cancelled.", "I am so sorry."]  # no exemplar recorded
    assert_rows_equal(rows_after, fresh_rows(reference_engine, history_after))
    assert np.array_equal(out["next"], fresh_codes(reference_engine, history[:-1], 0, "We rebook you.", 5, REPLY_MS))
    assert_rows_equal(rows, fresh_rows(reference_engine, history))


@pytest.mark.parametrize("policy", ["drop", "speak"])
def test_unknown_style_tags_follow_the_policy_and_never_fail(hf_checkpoint, policy):
    async def main():
        async with CSMService(hf_checkpoint, unknown_style_tags=policy) as service:
            conv = service.conversation("c")
            await speak_codes(conv, "[sarcastic] Oh, great.", seed=1)
            plain = service.conversation("plain")
            text = "Oh, great." if policy == "drop" else "[sarcastic] Oh, great."
            return conv.history[-1].text, await speak_codes(plain, text, seed=1), conv.history[-1].codes

    recorded, plain_codes, codes = asyncio.run(main())
    assert recorded == ("Oh, great." if policy == "drop" else "[sarcastic] Oh, great.")
    assert np.array_equal(codes, plain_codes)


def test_bad_styles_are_input_errors_that_change_nothing(hf_checkpoint):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            await service.add_style("calm", CALM)
            for name, exemplars in [("bad name!", CALM), ("empty", []), ("not-exemplars", [("x", 1)]),
                                    ("bad-speaker", [Exemplar(-1, "Hi there.", voice_audio(0.5), 16_000)]),
                                    ("bad-audio", [Exemplar(0, "Hi there.", np.zeros(10, np.float32), 16_000)])]:
                with pytest.raises((InputError, AudioError)):
                    await service.add_style(name, exemplars)
            assert service.styles == ["calm"]
            conv = service.conversation("c")
            with pytest.raises(InputError, match="unknown style 'nope'.*calm"):
                await speak_codes(conv, "Hello.", seed=1, style="nope")
            with pytest.raises(InputError):
                await speak_codes(conv, "Hello.", seed=1, style="not a name")
            assert conv.history == [] and not conv.speaking
            await speak_codes(conv, "Hello.", seed=1, style="calm")  # and the conversation still works
            return conv.history

    assert [s.text for s in asyncio.run(main())] == ["Hello."]


def test_a_styled_reply_cancelled_midway_keeps_what_was_delivered(hf_checkpoint, reference_engine):
    async def main():
        async with CSMService(hf_checkpoint) as service:
            await service.add_style("calm", CALM)
            conv = service.conversation("c")
            await conv.add_segment(1, "Hello?")
            reply = conv.speak("One two three four five six.", seed=6, style="calm", max_audio_ms=800)
            got = [await reply.__anext__() for _ in range(3)]
            await reply.aclose()
            await conv.add_segment(1, "Go on.")
            codes = await speak_codes(conv, "Seven eight.", seed=7)
            return got, conv.history, codes, await cache_rows(service, "c")

    got, history, codes, rows = asyncio.run(main())
    assert history[1].frames == 3 and np.array_equal(history[1].codes, np.concatenate([c.codes for c in got]))
    assert np.array_equal(codes, fresh_codes(reference_engine, history[:-1], 0, "Seven eight.", 7, REPLY_MS))
    assert_rows_equal(rows, fresh_rows(reference_engine, history))
