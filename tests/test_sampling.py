"""Frame sampling and the generation loop's stopping rules."""

from __future__ import annotations

import pytest
import torch

from csm_plugin.engine import (
    Engine,
    Sampling,
    gumbel_noise,
    max_frames_for_text,
    noise_keys,
    sample_topk,
    top_k_bucket,
)
from csm_plugin.errors import ContextTooLongError, InputError
from csm_plugin.models.loading import load_checkpoint
from csm_plugin.prompt import build_prompt

from conftest import generate_codes


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return load_checkpoint(hf_checkpoint)


def draw(logits, temperature, top_k, seed, frame, codebook=0):
    B = logits.shape[0]
    keys = noise_keys(torch.full((B,), seed), torch.full((B,), frame))
    k_cap = top_k_bucket(top_k, logits.shape[-1])
    return sample_topk(logits, torch.full((B,), temperature), torch.full((B,), top_k), k_cap, keys, codebook)


def test_topk_sampling_follows_the_softmax_of_the_top_k():
    logits = torch.tensor([[4.0, 3.0, 2.5, 2.0, 1.0, 0.5, -1.0, 3.5]])
    temperature, k, n = 0.9, 4, 4000
    draws = torch.cat([draw(logits, temperature, k, seed=7, frame=i) for i in range(n)])
    top = torch.topk(logits[0], k).indices
    assert set(draws.tolist()) == set(top.tolist())  # every top-k id appears, nothing else does
    p = torch.softmax(logits[0, top] / temperature, -1)
    freq = torch.stack([(draws == t).float().mean() for t in top])
    assert torch.allclose(freq, p, atol=0.03)


@pytest.mark.slow
def test_each_codebook_and_frame_draws_independently():
    # The same logits in 32 codebooks x 500 frames: the counter-based noise must not repeat
    # across codebooks or frames (every pairing of two codebooks' draws is near independent).
    logits = torch.zeros(1, 4)  # uniform over 4 codes
    draws = torch.tensor([[draw(logits, 1.0, 4, seed=3, frame=f, codebook=c).item() for c in range(32)] for f in range(500)])
    assert all(abs((draws == code).float().mean() - 0.25) < 0.04 for code in range(4))
    same = (draws[:, :-1] == draws[:, 1:]).float().mean()  # neighbouring codebooks agree 1/4 of the time
    assert abs(same - 0.25) < 0.03


def test_top_k_one_is_greedy_whatever_the_noise():
    logits = torch.randn(3, 50)
    assert all(torch.equal(draw(logits, 0.9, 1, seed, 0), logits.argmax(-1)) for seed in range(5))


def test_noise_depends_only_on_seed_frame_codebook_and_code():
    index = torch.arange(2051).expand(2, 2051)

    def noise(seed, frame, codebook):
        return gumbel_noise(noise_keys(torch.tensor([seed, 0]), torch.tensor([frame, 0])), codebook, index)[0]

    a = noise(5, 3, 1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, noise(5, 3, 1))
    assert torch.equal(a[7:9], gumbel_noise(noise_keys(torch.tensor([5]), torch.tensor([3])), 1, torch.tensor([[7, 8]]))[0])
    for other in (noise(5, 4, 1), noise(6, 3, 1), noise(5, 3, 2), noise(-5, 3, 1)):
        assert not torch.equal(a, other)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=0), dict(temperature=-1.0), dict(top_k=0), dict(top_k=2.5), dict(seed="x"), dict(max_audio_ms=10)]
)
def test_bad_sampling_settings(kwargs):
    with pytest.raises(InputError):
        Sampling(**kwargs)


def test_seed_gives_repeatable_codes(loaded):
    def run(seed):
        return torch.stack(generate_codes(loaded, [], 0, "Hello there.", Sampling(seed=seed, max_audio_ms=800)))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stops_at_length_cap_and_on_the_all_zero_frame(loaded):
    assert len(generate_codes(loaded, [], 0, "Hello there.", Sampling(max_audio_ms=400))) == 5
    # the default cap follows the text length
    assert max_frames_for_text("a" * 80) > max_frames_for_text("a" * 8) >= 25

    engine = Engine(loaded)
    sample_frames, calls = engine.generator.sample_frames, []

    def stops_at_frame_4(*args):
        calls.append(1)
        codes = sample_frames(*args)
        return codes * 0 if len(calls) == 4 else codes

    engine.generator.sample_frames = stops_at_frame_4
    frames = list(engine.synthesize([], 0, "Hello there.", Sampling()))
    assert len(frames) == 3  # the end-of-audio frame itself is not emitted


def test_prompt_longer_than_the_model_is_refused(loaded):
    text = "word " * 2100
    tokens, _ = build_prompt(loaded.tokenizer, [], 0, text)
    assert tokens.shape[0] > loaded.config.backbone.max_seq_len
    with pytest.raises(ContextTooLongError):
        next(Engine(loaded).synthesize([], 0, text, Sampling()))
