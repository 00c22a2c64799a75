"""Shared fixtures: small random checkpoints, made once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from csm_plugin.models.loading import make_test_checkpoint

# One torch thread for the whole session (worker threads included) unless OMP_NUM_THREADS asks for
# another count. torch's default is one thread per core; on a small shared machine (2 cores, other
# jobs running) every op then waits on oversubscribed threads: tests/test_service.py took 1.9x as
# long with the default at a load of 1.5, and it gets worse the busier the machine. The tiny test
# models gain nothing from intra-op parallelism. Server subprocesses the tests start set their own.
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(1)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Give a transformers model weights that separate logits clearly (its default init is too flat
    for greedy decoding to be a sharp test) and codebooks that make decoded audio depend on codes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("codec_model."):
                continue  # the codec keeps its own init; only its codebooks are randomized below
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name and "projector" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("embed_sum"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("cluster_usage"):
                b.copy_(0.5 + 1.5 * torch.rand(b.shape, generator=g))
            elif name.endswith("initialized"):
                b.fill_(True)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt-hf"), "hf", seed=0)


@pytest.fixture(scope="session")
def sesame_checkpoint(tmp_path_factory):
    return make_test_checkpoint(tmp_path_factory.mktemp("ckpt-sesame"), "sesame", seed=0)


def generate_codes(loaded, context, speaker: int, text: str, sampling) -> list[torch.Tensor]:
    """The frames (codes [32] each) the engine speaks for `text` after `context`."""
    from csm_plugin.engine import Engine

    return [frame.codes for frame in Engine(loaded).synthesize(context, speaker, text, sampling)]


# Three replies that end at different frames (3 -> 2 -> 1 streams batched), greedy and sampled.
BATCHED_REPLIES = [
    ("Hi! How are you?", dict(seed=1, max_audio_ms=640)),
    ("A different reply entirely.", dict(seed=4, temperature=0.7, top_k=40, max_audio_ms=480)),
    ("Answer.", dict(seed=9, top_k=64, max_audio_ms=320)),
]


def assert_batched_equals_solo(engine, reference, replies=BATCHED_REPLIES, atol=1e-5) -> None:
    """`engine` speaking `replies` together, a batch that shrinks as they end, gives each the
    codes and audio `reference` gives it alone."""
    import numpy as np

    from csm_plugin.engine import Sampling

    jobs = [(text, Sampling(**settings)) for text, settings in replies]
    frames: dict[int, list] = {i: [] for i in range(len(jobs))}
    streams = [engine.start(f"batched-{i}", [], 0, text, sampling) for i, (text, sampling) in enumerate(jobs)]
    while not all(s.done for s in streams):
        live = [(i, s) for i, s in enumerate(streams) if not s.done]
        for (i, _), frame in zip(live, engine.step_many([s for _, s in live])):
            if frame is not None:
                frames[i].append(frame)
    for i, ((text, sampling), stream) in enumerate(zip(jobs, streams)):
        engine.finish(stream, None, None)
        engine.release(f"batched-{i}")
        solo = list(reference.synthesize([], 0, text, sampling))
        assert torch.equal(torch.stack([f.codes for f in frames[i]]), torch.stack([f.codes for f in solo])), f"reply {i}: codes"
        got, want = np.concatenate([f.pcm for f in frames[i]]), np.concatenate([f.pcm for f in solo])
        assert np.abs(want).max() > 1e-3 and np.allclose(got, want, atol=atol, rtol=1e-4), f"reply {i}: audio"
    assert len({len(f) for f in frames.values()}) == len(jobs)  # they ended at different frames
