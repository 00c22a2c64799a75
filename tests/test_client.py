"""RemoteBackend against an in-process server: the local interface, exact history, replay after a
server restart, errors mapped onto the local error types."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from csm_plugin.backend import ConversationHandle, SpeechBackend
from csm_plugin.client import AuthenticationError, ConnectionLostError, RemoteBackend, ServerUnavailableError
from csm_plugin.engine import Engine, Sampling
from csm_plugin.errors import ConversationBusyError, InputError
from test_server_support import KEY, free_port, running_server


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def reference_engine(hf_checkpoint):
    return Engine.load(hf_checkpoint)


def fresh_codes(engine, history, speaker, text, seed, max_audio_ms):
    frames = engine.synthesize(list(history), speaker, text, Sampling(seed=seed, max_audio_ms=max_audio_ms))
    return torch.stack([f.codes for f in frames])


def voice(seconds=1.0, rate=16_000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def same_history(a, b) -> bool:
    return len(a) == len(b) and all(
        x.speaker == y.speaker and x.text == y.text
        and ((x.codes is None and y.codes is None) or (x.codes is not None and y.codes is not None and np.array_equal(x.codes, y.codes)))
        for x, y in zip(a, b)
    )


def server_history(state, conversation_id):
    key_id = state.keys.authenticate(f"Bearer {KEY}").key_id
    return state.sessions.get(key_id, conversation_id).conv.history


def test_remote_conversation_mirrors_the_local_one(hf_checkpoint, reference_engine):
    async def main():
        async with running_server(hf_checkpoint) as (url, state):
            backend = await RemoteBackend(url, api_key=KEY).start()
            assert isinstance(backend, SpeechBackend)
            conv = backend.conversation("call-1")
            assert isinstance(conv, ConversationHandle) and backend.conversation("call-1") is conv
            await conv.add_segment(1, "Hi, my parcel never arrived.", audio=voice(), sample_rate=16_000)
            assert conv.history[0].codes.shape == (13, 32)
            before = conv.history
            chunks = [c async for c in conv.speak("I am sorry to hear that.", seed=1, max_audio_ms=640)]
            chunks = [c for c in chunks if c.num_frames]  # (a last chunk may carry only words)
            assert len(chunks) == 8 and all(c.pcm.dtype == np.int16 and len(c.pcm) == 1920 for c in chunks)
            assert [c.start_ms for c in chunks] == [80 * i for i in range(8)] and chunks[0].words[0].text == "I"
            assert np.array_equal(conv.history[-1].codes, fresh_codes(reference_engine, before, 0, "I am sorry to hear that.", 1, 640))
            assert same_history(conv.history, server_history(state, "call-1"))

            # stopping early keeps exactly the delivered frames, on both sides
            async with contextlib.aclosing(conv.speak("One two three four five six seven eight nine ten.", seed=2, max_audio_ms=2400)) as stream:
                got = 0
                async for _ in stream:
                    got += 1
                    if got == 3:
                        break
            assert not conv.speaking
            await conv.add_segment(1, "Go on.")  # waits for the server's account of the cut reply
            assert conv.history[-2].codes.shape[0] == 3 and conv.history[-2].text == "One"
            assert same_history(conv.history, server_history(state, "call-1"))

            # barge-in with played_ms during a reply, then after a reply
            chunks = []
            async for chunk in conv.speak("Let me look at the tracking number for you.", seed=3, max_audio_ms=2400):
                chunks.append(chunk)
                if len(chunks) == 2:
                    with pytest.raises(ConversationBusyError):
                        await conv.add_segment(1, "Hello?")
                    await conv.interrupt(played_ms=100)
            assert conv.history[-1].codes.shape[0] == 2 and len(chunks) >= 2
            [c async for c in conv.speak("It is on its way.", seed=4, max_audio_ms=640)]
            await conv.interrupt(played_ms=250)
            assert conv.history[-1].codes.shape[0] == 4 and conv.history[-1].text == "It is"
            assert same_history(conv.history, server_history(state, "call-1"))

            # errors keep their local types
            with pytest.raises(InputError):
                [c async for c in conv.speak("x" * 5000)]
            with pytest.raises(InputError):
                await conv.add_segment(1, "   ")
            await conv.close()
            assert backend.conversation("call-1") is not conv
            await backend.close()

            with pytest.raises(AuthenticationError):
                await RemoteBackend(url, api_key="wrong-key-0123456789abc", ready_timeout=2).start()

    run(main())


@pytest.mark.slow
def test_history_is_replayed_after_a_server_restart(hf_checkpoint, reference_engine):
    port = free_port()

    async def main():
        first_server = contextlib.AsyncExitStack()
        url, _ = await first_server.enter_async_context(running_server(hf_checkpoint, port=port))
        backend = await RemoteBackend(url, api_key=KEY, reconnect_timeout=3).start()
        conv = backend.conversation("call-2")
        await conv.add_segment(1, "Good morning.", audio=voice(0.5), sample_rate=16_000)
        [c async for c in conv.speak("Morning! How can I help?", seed=5, max_audio_ms=480)]
        # the server goes away in the middle of a reply: the reply fails, what was heard stays
        shutdown = None
        with pytest.raises(ConnectionLostError):
            async for _ in conv.speak("Please hold on while I check a few things for you.", seed=6, max_audio_ms=4000):
                shutdown = shutdown or asyncio.create_task(first_server.aclose())
        await shutdown
        heard = conv.history[-1]  # the frames received before the break, with their codes
        assert heard.text.startswith("Please") and heard.codes is not None and heard.codes.shape[0] >= 1
        with pytest.raises(ServerUnavailableError):  # nobody there: bounded retries, then a clear error
            await conv.add_segment(1, "Hello?")

        async with running_server(hf_checkpoint, port=port) as (url, state):  # a new process at the same address
            assert len(state.sessions) == 0
            await conv.add_segment(1, "I want to change my address.")
            before = conv.history
            [c async for c in conv.speak("Sure, what is the new address?", seed=7, max_audio_ms=480)]
            assert conv.replays == 1
            assert same_history(conv.history, server_history(state, "call-2"))
            assert np.array_equal(conv.history[-1].codes, fresh_codes(reference_engine, before, 0, "Sure, what is the new address?", 7, 480))
            await backend.close()

        with pytest.raises(ServerUnavailableError):
            await RemoteBackend(f"http://127.0.0.1:{port}", api_key=KEY, ready_timeout=0.5).start()

    run(main())
