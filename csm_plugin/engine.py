"""The inference loop: prefill rows into a cache slot, then generate one 80 ms frame at a time.

Sampling noise is drawn per (seed, frame), not from a shared random stream, so a stream's codes do
not depend on what else runs beside it. Temperature + top-k sampling is Gumbel-max over the top-k
logits, which samples softmax(logits / T) restricted to the top k.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .audio import resample_to_24k
from .errors import ContextTooLongError, InputError
from .models.csm import CSM
from .models.loading import DEFAULT_MODEL, LoadedCheckpoint, load_checkpoint
from .prompt import Segment, build_prompt

FRAME_MS = 80
FRAMES_PER_SECOND = 1000 / FRAME_MS


@dataclass(frozen=True)
class Sampling:
    """temperature and top_k as in Sesame's reference (0.9 / 50); top_k=1 is greedy.
    max_audio_ms caps the reply; by default it follows the text length (CSM sometimes never stops)."""

    temperature: float = 0.9
    top_k: int = 50
    seed: int = 0
    max_audio_ms: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise InputError(f"temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InputError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an int, got {self.seed!r}")
        if self.max_audio_ms is not None and not self.max_audio_ms >= FRAME_MS:
            raise InputError(f"max_audio_ms must be at least {FRAME_MS}, got {self.max_audio_ms!r}")


def max_frames_for_text(text: str, max_audio_ms: float | None = None) -> int:
    """A generous bound on speech length: 2 s plus 8 characters a second (slow speech is ~12)."""
    if max_audio_ms is None:
        max_audio_ms = 1000 * (2.0 + len(text) / 8.0)
    return max(1, int(max_audio_ms // FRAME_MS))


def frame_gumbel_noise(seed: int, frame: int, num_codebooks: int, vocab: int, device) -> torch.Tensor:
    """Gumbel noise [num_codebooks, vocab] that depends only on (seed, frame)."""
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + frame) % (2**63))
    u = torch.rand(num_codebooks, vocab, generator=g).clamp_(min=1e-10, max=1 - 1e-7)
    return (-torch.log(-torch.log(u))).to(device)


def sample_topk(logits: torch.Tensor, temperature: float, top_k: int, gumbel: torch.Tensor) -> torch.Tensor:
    """logits [B, V], gumbel [B, V] -> codes [B]."""
    logits = logits.float()
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits / temperature
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    return (logits + gumbel).argmax(-1)


class Generator:
    """Runs a CSM model for streams that each own a backbone cache slot.

    Not thread-safe: one thread owns a Generator (the service's inference worker).
    """

    def __init__(self, model: CSM, slots: int = 1):
        self.model = model
        self.cfg = model.cfg
        self.device = model.codebook0_head.weight.device
        if model.backbone_cache is None or model.backbone_cache.slots < slots:
            model.setup_caches(slots, max_batch=slots)

    @property
    def max_positions(self) -> int:
        return self.cfg.backbone.max_seq_len

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: torch.Tensor, mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Write rows [T, 33] at positions start..start+T-1 of `slot`; return the last hidden state [dim]."""
        T = tokens.shape[0]
        if start + T > self.max_positions:
            raise ContextTooLongError(
                f"{start + T} rows do not fit in the model's {self.max_positions} positions"
            )
        x = self.model.embed_rows(tokens[None].to(self.device), mask[None].to(self.device))
        positions = torch.arange(start, start + T, device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        return self.model.backbone_forward(x, positions, slots)[0, -1]

    @torch.inference_mode()
    def feed_frames(self, slots: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one generated frame per stream: codes [B, 32] at positions [B] -> hidden [B, dim]."""
        x = self.model.embed_frame(codes.to(self.device))
        return self.model.backbone_forward(x, positions.to(self.device)[:, None], slots.to(self.device))[:, -1]

    @torch.inference_mode()
    def sample_frames(
        self, h: torch.Tensor, noise: torch.Tensor, temperature: float, top_k: int
    ) -> torch.Tensor:
        """Backbone hidden h [B, dim] + noise [B, 32, V] -> codes [B, 32]: codebook 0 from the
        backbone head, codebooks 1..31 from the depth decoder, whose cache restarts every frame."""
        m = self.model
        codes = torch.empty(h.shape[0], self.cfg.num_codebooks, dtype=torch.long, device=self.device)
        codes[:, 0] = sample_topk(m.codebook0_logits(h), temperature, top_k, noise[:, 0])
        x = torch.stack([h, m.embed_code(codes[:, 0], 0)[:, 0]], dim=1)  # [B, 2, dim]
        d = m.decoder_forward(x, start=0)[:, -1]
        for i in range(1, self.cfg.num_codebooks):
            codes[:, i] = sample_topk(m.depth_logits(d, i), temperature, top_k, noise[:, i])
            if i + 1 < self.cfg.num_codebooks:
                d = m.decoder_forward(m.embed_code(codes[:, i], i), start=i + 1)[:, -1]
        return codes

    def frame_noise(self, seed: int, frame: int) -> torch.Tensor:
        return frame_gumbel_noise(seed, frame, self.cfg.num_codebooks, self.cfg.audio_vocab_size, self.device)

    def generate(
        self, tokens: torch.Tensor, mask: torch.Tensor, text: str, sampling: Sampling = Sampling(), slot: int = 0
    ) -> Iterator[torch.Tensor]:
        """Prefill a whole prompt into `slot`, then yield frames (codes [32], on CPU) until the
        all-zero end-of-audio frame (not yielded) or the length cap."""
        h = self.prefill(slot, tokens, mask)[None]
        position = tokens.shape[0]
        limit = min(max_frames_for_text(text, sampling.max_audio_ms), self.max_positions - position)
        if limit < 1:
            raise ContextTooLongError(f"the prompt ({position} rows) leaves no room for audio")
        slots = torch.tensor([slot])
        for frame in range(limit):
            noise = self.frame_noise(sampling.seed, frame)[None]
            codes = self.sample_frames(h, noise, sampling.temperature, sampling.top_k)
            if not codes.any():
                return
            yield codes[0].cpu()
            if frame + 1 < limit:
                h = self.feed_frames(slots, codes, torch.tensor([position]))
                position += 1


@dataclass(frozen=True)
class AudioFrame:
    """One generated 80 ms frame: its codes [32] and its 1920 samples (float32, 24 kHz)."""

    codes: torch.Tensor
    pcm: np.ndarray


class Engine:
    """A loaded model with its tokenizer and codec: encode context audio, speak frame by frame.

    Synchronous and single-threaded; the service runs it on its one inference thread.
    """

    def __init__(self, checkpoint: LoadedCheckpoint, slots: int = 1):
        self.checkpoint = checkpoint
        self.tokenizer = checkpoint.tokenizer
        self.codec = checkpoint.codec
        self.generator = Generator(checkpoint.model, slots=slots)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        slots: int = 1,
    ) -> "Engine":
        return cls(load_checkpoint(model, device=device, dtype=parse_dtype(dtype)), slots=slots)

    @torch.inference_mode()
    def encode_audio(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Mono audio at any rate -> Mimi codes [frames, 32] (on CPU)."""
        wav = resample_to_24k(audio, sample_rate)
        codes = self.codec.encode(torch.from_numpy(wav)[None, None])
        return codes[0].T.cpu()

    def synthesize(
        self, context: list[Segment], speaker: int, text: str, sampling: Sampling = Sampling(), slot: int = 0
    ) -> Iterator[AudioFrame]:
        """Speak `text` as `speaker` after `context`: frames as soon as each is generated."""
        tokens, mask = build_prompt(self.tokenizer, context, speaker, text)
        state = self.codec.decode_state(1)
        for codes in self.generator.generate(tokens, mask, text, sampling, slot=slot):
            with torch.inference_mode():
                pcm = self.codec.decode_step(codes[None, :, None], state)
            yield AudioFrame(codes, pcm[0, 0].float().cpu().numpy())


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise InputError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]
