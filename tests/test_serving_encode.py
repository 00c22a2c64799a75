"""Input encoding never holds up other streams: a user turn's audio is Mimi-encoded off the
inference thread, so replies in progress keep getting frames while a long turn is encoded (the
time it would otherwise pause them is measured by bench/serving_faults.py, not asserted here)."""

from __future__ import annotations

import asyncio
import threading

import time

import numpy as np
import pytest
import torch

from csm_plugin.engine import Engine
from csm_plugin.service import CSMService


def run(coro):
    return asyncio.run(coro)


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_replies_keep_their_frames_while_a_turn_is_encoded(hf_checkpoint, monkeypatch):
    release = threading.Event()
    encoding = threading.Event()
    threads = []
    original = Engine.encode_audio

    def slow_encode(self, audio, sample_rate):
        threads.append(threading.current_thread().name)
        encoding.set()
        assert release.wait(60), "the test never released the encoder"
        return original(self, audio, sample_rate)

    async def main():
        async with CSMService(hf_checkpoint) as service:
            talker = service.conversation("talker")
            listener = service.conversation("listener")
            wav = tone(3.0)
            monkeypatch.setattr(Engine, "encode_audio", slow_encode)
            adding = asyncio.create_task(listener.add_segment(1, "A long user turn.", audio=wav, sample_rate=16_000))
            await asyncio.wait_for(asyncio.to_thread(encoding.wait, 30), 31)
            # the encoder is busy (held here): a reply on another conversation still runs to its end
            chunks = await asyncio.wait_for(_collect(talker.speak("Meanwhile I keep talking.", seed=1, max_audio_ms=480)), 30)
            assert sum(c.num_frames for c in chunks) == 6 and not adding.done()
            release.set()
            await asyncio.wait_for(adding, 30)
            assert threads and all(name != "csm-inference" for name in threads)
            # the codes are those of encoding the same audio directly
            assert np.array_equal(listener.history[-1].codes, original(service.engine, wav, 16_000).numpy().astype(np.uint16))

    try:
        run(main())
    finally:
        release.set()


async def _collect(reply):
    return [c async for c in reply]


def test_voices_are_encoded_off_the_inference_thread_too(hf_checkpoint, monkeypatch):
    names = []
    original = Engine.encode_audio

    def spy(self, audio, sample_rate):
        names.append(threading.current_thread().name)
        return original(self, audio, sample_rate)

    async def main():
        async with CSMService(hf_checkpoint) as service:
            monkeypatch.setattr(Engine, "encode_audio", spy)
            voice = await service.add_voice("agent", text="Hello there.", audio=tone(1.0), sample_rate=16_000)
            assert voice.codes.shape == (13, 32) and names and names[0] != "csm-inference"
        assert torch.is_grad_enabled()  # nothing leaked into the caller's thread state

    run(main())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoding_on_a_side_stream_beside_compiled_frame_steps_on_gpu(hf_checkpoint):
    """On a GPU the encoder runs on a CUDA stream of its own beside the CUDA-graph frame steps:
    the same codes as encoding on the default stream, and the reply beside it runs to its end
    (its frame gaps are printed, not asserted)."""

    async def main():
        async with CSMService(hf_checkpoint, device="cuda", compile=True, max_cached_conversations=2) as service:
            wav = tone(60.0)
            expected = service.engine.encode_audio(wav, 16_000).numpy().astype(np.uint16)
            talker, listener = service.conversation("talker"), service.conversation("listener")
            times: list[float] = []

            async def speak():
                async for chunk in talker.speak("A reply that runs while the long turn is encoded. " * 3, seed=1, max_audio_ms=6000):
                    times.append(time.perf_counter())

            task = asyncio.create_task(speak())
            while len(times) < 5:
                await asyncio.sleep(0.005)
            start = time.perf_counter()
            await listener.add_segment(1, "A long user turn.", audio=wav, sample_rate=16_000)
            end = time.perf_counter()
            await asyncio.wait_for(task, 120)
            assert np.array_equal(listener.history[-1].codes, expected)
            gaps = np.diff(times)
            during = [g for t, g in zip(times[1:], gaps) if start <= t <= end + 0.2]
            print(f"GPU: 60 s encoded in {1000 * (end - start):.0f} ms beside a reply; frame gap median "
                  f"{1000 * np.median(gaps):.1f} ms, max while encoding {1000 * max(during, default=0):.1f} ms "
                  f"({len(during)} frames then)")

    run(main())
