"""The compiled depth pass (torch.compile: fused kernels on CPU, CUDA graphs on GPUs) against eager."""

from __future__ import annotations

import pytest
import torch

from csm_plugin.engine import Engine, Sampling, batch_bucket
from csm_plugin.prompt import Segment, build_prompt

SEEDS, TEMPERATURES, TOP_K = [3, 11, 5], [0.9, 0.7, 1.0], [1, 50, 20]  # greedy and sampled in one batch


def hidden_states(engine: Engine) -> torch.Tensor:
    """Real backbone outputs [3, dim] for three different prompts."""
    rows = []
    for slot, text in enumerate(["Hello there.", "How can I help?", "Goodbye now."]):
        tokens, mask = build_prompt(engine.tokenizer, [Segment(1, "Hi.", torch.randint(0, 2048, (4, 32)))], 0, text)
        rows.append(engine.generator.prefill(slot, tokens, mask))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    return Engine.load(hf_checkpoint, slots=3), Engine.load(hf_checkpoint, slots=3, compile=True)


def test_compiled_frames_equal_eager_frames(engines):
    eager, compiled = engines
    assert compiled.generator.compiled and batch_bucket(3) == 4  # the batch of 3 runs padded to 4
    h = hidden_states(eager)
    for frame in range(3):
        args = (SEEDS, [frame] * 3, TEMPERATURES, TOP_K)
        want, got = eager.generator.sample_frames(h, *args), compiled.generator.sample_frames(h, *args)
        assert got.shape == (3, 32)
        assert torch.equal(got, want)
        # The depth decoder saw close activations at every position (keys and values of the frame).
        for a, b in [(eager.checkpoint.model.decoder_cache.k, compiled.checkpoint.model.decoder_cache.k),
                     (eager.checkpoint.model.decoder_cache.v, compiled.checkpoint.model.decoder_cache.v)]:
            assert torch.allclose(a[:, :3, :, :32], b[:, :3, :, :32], atol=1e-5, rtol=1e-4)


def test_compiled_streams_stay_independent(engines):
    _, compiled = engines
    h = hidden_states(compiled)
    args = (SEEDS, [0] * 3, TEMPERATURES, TOP_K)
    before = compiled.generator.sample_frames(h, *args)
    h[1] += 0.5 * torch.randn_like(h[1])
    after = compiled.generator.sample_frames(h, *args)
    assert torch.equal(before[[0, 2]], after[[0, 2]])  # padding rows and neighbours do not leak
    assert not torch.equal(before[1], after[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager_on_gpu(hf_checkpoint):
    eager = Engine.load(hf_checkpoint, device="cuda")
    compiled = Engine.load(hf_checkpoint, device="cuda", compile=True)
    for sampling in (Sampling(top_k=1, max_audio_ms=640), Sampling(seed=2, max_audio_ms=640)):
        want = [f.codes for f in eager.synthesize([], 0, "Hello there.", sampling)]
        got = [f.codes for f in compiled.synthesize([], 0, "Hello there.", sampling)]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
