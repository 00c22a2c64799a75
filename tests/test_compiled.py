"""Compiled frame steps (torch.compile: C++ kernels on CPU, CUDA graphs on GPUs) against eager."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_batched_equals_solo

from csm_plugin.engine import Engine, FrameGenerator, Sampling
from csm_plugin.engine.graphs import CUDA_GRAPHS_ENV
from csm_plugin.errors import InputError
from csm_plugin.prompt import Segment, build_prompt

pytestmark = pytest.mark.slow  # compiles the frame steps with torch.compile (tens of seconds of C++ builds on CPU)

SEEDS, TEMPERATURES, TOP_K = [3, 11, 5], [0.9, 0.7, 1.0], [1, 50, 20]  # greedy and sampled in one batch


def hidden_states(engine: Engine, lengths: list | None = None) -> torch.Tensor:
    """Real backbone outputs [3, dim] for three prompts of different lengths, in slots 0..2."""
    rows, g = [], torch.Generator().manual_seed(0)
    for slot, text in enumerate(["Hello there.", "How can I help you today?", "Goodbye now."]):
        context = [Segment(1, "Hi.", torch.randint(0, 2048, (4 + 3 * slot, 32), generator=g))]
        tokens, mask = build_prompt(engine.tokenizer, context, 0, text)
        rows.append(engine.generator.prefill(slot, tokens, mask))
        if lengths is not None:
            lengths.append(tokens.shape[0])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def engines(hf_checkpoint):
    # Two compiled batch sizes (fewer than the default powers of two: 1, 2, 4): 2 and 3 streams run padded to 4.
    compiled = Engine.load(hf_checkpoint, slots=3, compile=True, compile_batches=(1, 4))
    compiled.warm_up()  # batch sizes 1 and 4 at the default top-k width (64)
    return Engine.load(hf_checkpoint, slots=3), compiled


def test_compiled_engine_streams_equal_eager_solo_streams(engines):
    """Three replies batched (3 -> 2 -> 1 streams as they end: rows 4, 4, 1) equal each one alone, eager,
    codes and audio; the warm-up compiled every graph they need."""
    from torch._dynamo.utils import counters

    eager, compiled = engines
    graphs = counters["stats"]["unique_graphs"]
    assert_batched_equals_solo(compiled, eager)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while speaking


def test_warm_up_compiles_each_step_once_per_batch_size(hf_checkpoint):
    """One graph per compiled function and batch size: the backbone step, the first depth step and
    the other 30 (whose inputs all have the same strides, or each would compile twice)."""
    from torch._dynamo.utils import counters

    engine = Engine.load(hf_checkpoint, slots=2, compile=True, compile_batches=(2,))  # a size no other test compiles
    before = counters["stats"]["unique_graphs"]
    engine.warm_up()
    assert counters["stats"]["unique_graphs"] - before == 3


def test_compiled_frames_equal_eager_frames(engines):
    eager, compiled = engines
    assert compiled.generator.mode == "compiled" and [compiled.generator.bucket(b) for b in (1, 2, 3)] == [1, 4, 4]
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


def test_compiled_backbone_step_equals_eager(engines):
    """One generated frame fed back per stream, each at its own slot and position, twice."""
    eager, compiled = engines
    lengths: list[int] = []
    hidden_states(eager, lengths)
    hidden_states(compiled)
    order = torch.tensor([2, 0, 1])  # slots in any order; the batch of 3 is padded to 4
    positions = torch.tensor(lengths)[order]
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        codes = torch.randint(0, 2048, (3, 32), generator=g)
        want = eager.generator.feed_frames(order, codes, positions + step)
        got = compiled.generator.feed_frames(order, codes, positions + step)
        assert got.shape == want.shape == (3, eager.checkpoint.config.backbone.dim)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # The padding row wrote only into the scratch slot: the real slots hold the same cache.
    a, b = eager.checkpoint.model.backbone_cache.k, compiled.checkpoint.model.backbone_cache.k
    for slot in range(3):
        n = lengths[slot] + 2
        assert torch.allclose(a[:, slot, :, :n], b[:, slot, :, :n], atol=1e-5, rtol=1e-4)
    assert compiled.generator._scratch_slot == 3 and b.shape[1] == 4


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
@pytest.mark.parametrize("compile", [True, "graphs"])
def test_cuda_graphs_match_eager_on_gpu(hf_checkpoint, compile):
    """The backbone step, the depth pass and the Mimi step each replayed as one CUDA graph per
    batch bucket (of torch.compile'd kernels, or of the eager ones): one stream, then three
    batched and padded, equal eager on the same GPU."""
    eager = Engine.load(hf_checkpoint, device="cuda", slots=3)
    compiled = Engine.load(hf_checkpoint, device="cuda", slots=3, compile=compile, compile_batches=(1, 4))
    compiled.warm_up()
    assert compiled.cuda_graphs or os.environ.get(CUDA_GRAPHS_ENV) == "0"
    for sampling in (Sampling(top_k=1, max_audio_ms=640), Sampling(seed=2, max_audio_ms=640)):
        want = [f.codes for f in eager.synthesize([], 0, "Hello there.", sampling)]
        got = [f.codes for f in compiled.synthesize([], 0, "Hello there.", sampling)]
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert_batched_equals_solo(compiled, eager, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_attention_backends_agree_in_bf16(hf_checkpoint):
    """In bf16 on H100/H200 recent torch picks cuDNN's attention, which has had silent GQA bugs on
    other GPUs (pytorch#193893): the backbone prefill and the depth decoder (GQA, few kv heads)
    agree with the math backend, up to bf16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    engine = Engine.load(hf_checkpoint, device="cuda", dtype="bfloat16", slots=3)

    @torch.inference_mode()
    def run() -> list[torch.Tensor]:
        h = hidden_states(engine)  # [3, dim], three prompts of different lengths
        d = engine.checkpoint.model.decoder_forward(torch.stack([h, h.flip(0)], dim=1), start=0)
        return [h.float(), d.float()]

    default = run()
    with sdpa_kernel(SDPBackend.MATH):
        reference = run()
    for got, want in zip(default, reference):
        assert (got - want).norm() <= 0.1 * want.norm()


def test_compiled_batch_sizes_are_checked(hf_checkpoint):
    model = Engine.load(hf_checkpoint).checkpoint.model
    assert FrameGenerator(model, slots=5).batches == [1, 2, 4, 8]  # the default: powers of two
    for bad in [(), (1, 2), (0, 8), (True, 8), (2.0, 8)]:
        with pytest.raises(InputError, match="compiled batch sizes"):
            FrameGenerator(model, slots=5, batches=bad)
