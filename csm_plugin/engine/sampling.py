"""Per-stream sampling: the settings (Sampling), the reply length bound, and seeded Gumbel top-k.

Sampling noise is drawn per (seed, frame), not from a shared random stream, so a stream's codes do
not depend on what else runs beside it. Temperature + top-k sampling is Gumbel-max over the top-k
logits, which samples softmax(logits / T) restricted to the top k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conversation.options import check_sampling
from ..conversation.types import FRAME_MS  # re-exported by core.py and the package
from ..errors import InputError


@dataclass(frozen=True)
class Sampling:
    """temperature and top_k as in Sesame's reference (0.9 / 50); top_k=1 is greedy.
    max_audio_ms caps the reply; by default it follows the text length (CSM sometimes never stops)."""

    temperature: float = 0.9
    top_k: int = 50
    seed: int = 0
    max_audio_ms: float | None = None

    def __post_init__(self):
        if self.seed is None:
            raise InputError("seed must be an int, got None")
        check_sampling(self.temperature, self.top_k, self.seed, self.max_audio_ms)


def max_frames_for_text(text: str, max_audio_ms: float | None = None) -> int:
    """A generous bound on speech length: 2 s plus 8 characters a second (slow speech is ~12)."""
    if max_audio_ms is None:
        max_audio_ms = 1000 * (2.0 + len(text) / 8.0)
    return max(1, int(max_audio_ms // FRAME_MS))


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) without leaving int64's range (no overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32) on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_keys(seeds: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Per-stream keys [B] for one frame's sampling noise, from seeds and frame numbers [B]."""
    return _hash32(_hash32(seeds & _MASK32) ^ (frames & _MASK32))


def gumbel_noise(keys: torch.Tensor, codebook: int, index: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [B, n] for codes `index` [B, n] of `codebook`: a pure function of (key, codebook,
    code), computed on the model's device. Counter-based rather than a random stream, so a stream's
    codes do not depend on its batch, and the whole frame can run in one compiled graph."""
    salt = _hash32(keys ^ (codebook * 0x9E3779B9 & _MASK32))  # [B]
    bits = _hash32((salt[:, None] + index) & _MASK32) >> 8  # 24 random bits
    u = (bits.float() + 0.5) / (1 << 24)  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def top_k_bucket(max_top_k: int, vocab: int) -> int:
    """The static top-k width for a batch: the next power of two (few distinct compiled shapes)."""
    return min(vocab, 1 << max(0, max_top_k - 1).bit_length())


def sample_topk(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, k_cap: int, keys: torch.Tensor, codebook: int
) -> torch.Tensor:
    """logits [B, V], per-stream temperature [B] and top_k [B] (each <= k_cap), noise keys [B]
    -> codes [B]. Gumbel-max over the top k: samples softmax(logits / T) restricted to the top k;
    top_k 1 is greedy. No host sync and static shapes."""
    scaled = logits.float() / temperature[:, None]
    values, index = torch.topk(scaled, k_cap, dim=-1)  # [B, k_cap], descending
    rank = torch.arange(k_cap, device=logits.device)
    noisy = (values + gumbel_noise(keys, codebook, index)).masked_fill(rank >= top_k[:, None], float("-inf"))
    return index.gather(1, noisy.argmax(-1, keepdim=True))[:, 0]
