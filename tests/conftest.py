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
