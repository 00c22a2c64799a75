"""CSM language model: a Llama-3.2 backbone and a small Llama depth decoder over Mimi RVQ codes.

Per 80 ms frame the backbone reads one row (33 columns: 32 audio codebooks + 1 text token) and
predicts codebook 0; the depth decoder then predicts codebooks 1..31 in 31 tiny autoregressive steps.
Weights use the rotate-half RoPE layout (transformers'); loading.py permutes Sesame's interleaved
q/k rows into it.

Static KV cache: the backbone keeps a preallocated pool of `slots` sequences; a conversation owns a
slot, and a step reads only the positions up to its own, so truncating a history is just writing
from an earlier position again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ContextTooLongError


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling. transformers spells the same curve with other but equivalent
    numbers for CSM (low 0.125, high 0.5, original 1024); any consistent triple works here."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)


@dataclass(frozen=True)
class CSMConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051  # 2048 Mimi codes + 3 ids the codec cannot take
    num_codebooks: int = 32
    bos_token_id: int = 128_000
    eos_token_id: int = 128_001

    @property
    def num_columns(self) -> int:
        return self.num_codebooks + 1


# Sesame's flavors (torchtune llama3_2 builds); max_seq_len of the decoder is the number of codebooks.
FLAVORS: dict[str, dict] = {
    "llama-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, intermediate_size=8192),
    "llama-100M": dict(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, intermediate_size=8192),
}


def csm_1b_config() -> CSMConfig:
    return CSMConfig(
        backbone=TransformerConfig(**FLAVORS["llama-1B"], max_seq_len=2048),
        decoder=TransformerConfig(**FLAVORS["llama-100M"], max_seq_len=32),
    )


# RoPE in the rotate-half layout (transformers'): dims i and i + head_dim/2 rotate together.
# Mimi (mimi.py) uses these helpers too.


def hf_rope_settings(d: dict) -> tuple[str, float | None, dict]:
    """The RoPE settings of a transformers config dict in either spelling (`rope_parameters`, or
    the older `rope_scaling` + top-level `rope_theta`): (rope type, theta or None, the rope dict)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default")), rope.get("rope_theta", d.get("rope_theta")), rope


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    # fp32 throughout, like torchtune and transformers, so positions map to the same angles.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float positions [...] -> cos, sin [..., head_dim] of their rotation angles."""
    angles = positions[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout: each angle twice
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., head_dim] by angles given as cos, sin (broadcast against x)."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the model dtype, as both references do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values: [layers, slots, kv_heads, max_len, head_dim] each."""

    def __init__(self, cfg: TransformerConfig, slots: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (cfg.n_layers, slots, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("layer_index", torch.arange(cfg.n_layers, device=device), persistent=False)
        self.register_buffer("head_index", torch.arange(cfg.n_kv_heads, device=device), persistent=False)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def read_rows(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of positions 0..length-1 of `slot`: k, v [layers, kv_heads, length, head_dim]."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def write_rows(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Overwrite positions 0..L-1 of `slot` with rows from read_rows (in place: the buffers
        keep their addresses, which compiled CUDA graphs rely on)."""
        self.k[:, slot, :, : k.shape[2]].copy_(k)
        self.v[:, slot, :, : v.shape[2]].copy_(v)

    def update(self, layer: int, slots: torch.Tensor | None, positions: torch.Tensor, length: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, head_dim] at positions [B, T] of `slots` [B]; return the
        cache of those slots up to `length` (one past the furthest position): [B, kv_heads, L, head_dim].
        slots=None means slots 0..B-1 (the depth decoder), read back as plain slices.
        `length` comes from the caller so a step reads positions back to the host once, not per layer.
        The write is one index_put_ on the whole buffer, not on a view of it: under torch.compile a
        write through a view can turn into a copy of the whole pool at every step."""
        rows = torch.arange(k.shape[0], device=k.device) if slots is None else slots
        # layer, [B, 1, 1], [1, Hkv, 1], [B, 1, T]: broadcast to [B, Hkv, T], k's own layout
        index = (self.layer_index[layer], rows[:, None, None], self.head_index[None, :, None], positions[:, None, :])
        self.k.index_put_(index, k)
        self.v.index_put_(index, v)
        if slots is None:
            return self.k[layer, : k.shape[0], :, :length], self.v[layer, : k.shape[0], :, :length]
        return (
            self.k[layer, :, :, :length].index_select(0, slots),
            self.v[layer, :, :, :length].index_select(0, slots),
        )


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache, layer: int, slots, positions, length: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin).to(x.dtype)
        k = apply_rope(k, cos, sin).to(x.dtype)
        k, v = cache.update(layer, slots, positions, length, k, v)  # [B, Hkv, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, slots, positions, length):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, slots, positions, length)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Llama blocks without token embedding or output head; returns the final-normed hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE tables in place; also needed after building the model on `meta`."""
        device = self.norm.weight.device
        if device.type == "meta":  # weights not loaded yet; reset_buffers() runs after loading
            return
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling).to(device)
        positions = torch.arange(self.cfg.max_seq_len, device=device, dtype=torch.float32)
        self.rope_cos, self.rope_sin = rope_cos_sin(positions, inv_freq)  # [max_len, Dh] each

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor | None, static: bool = False
    ):
        """x [B, T, dim], positions [B, T] (absolute, per stream), slots [B] -> [B, T, dim]
        (slots None: streams 0..B-1 at the same positions, see KVCache.update).
        static: read all max_seq_len cache positions, later ones masked, instead of only those up
        to the furthest position: no host sync and the same shapes at every position, so one
        compiled graph serves them all (the compiled backbone and depth-decoder steps)."""
        if static:
            length = self.cfg.max_seq_len
        else:
            length = int(positions.max()) + 1  # the one host sync of a backbone pass
            if length > self.cfg.max_seq_len:
                raise ContextTooLongError(f"position {length - 1} is past the model's {self.cfg.max_seq_len} positions")
        cos = self.rope_cos[positions][:, None]  # [B, 1, T, Dh], fp32
        sin = self.rope_sin[positions][:, None]
        if not static and x.shape[1] == 1 and (slots is None or x.shape[0] == 1):
            mask = None  # one query per stream, at the last position read: it sees every key
        else:
            # Causal over absolute positions: a query sees every key at or before its own position.
            # Keys past it (stale entries of an earlier, longer history) are masked out.
            mask = torch.arange(length, device=x.device)[None, None, :] <= positions[:, :, None]
            mask = mask[:, None]  # [B, 1, T, L]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, slots, positions, length)
        return self.norm(x)


class CSM(nn.Module):
    def __init__(self, cfg: CSMConfig):
        super().__init__()
        self.cfg = cfg
        bb, dec = cfg.backbone, cfg.decoder
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, bb.dim)
        # One table for all codebooks: codebook k, code c -> row k * audio_vocab_size + c.
        self.audio_embeddings = nn.Embedding(cfg.audio_vocab_size * cfg.num_codebooks, bb.dim)
        self.backbone = Transformer(bb)
        self.codebook0_head = nn.Linear(bb.dim, cfg.audio_vocab_size, bias=False)
        self.projection = nn.Linear(bb.dim, dec.dim, bias=False)
        self.decoder = Transformer(dec)
        # [in, out] layout: logits of codebook i = h @ audio_head[i - 1].
        self.audio_head = nn.Parameter(torch.empty(cfg.num_codebooks - 1, dec.dim, cfg.audio_vocab_size))
        self.register_buffer("codebook_offsets", torch.empty(cfg.num_codebooks, dtype=torch.long), persistent=False)
        self.reset_buffers()
        self.backbone_cache: KVCache | None = None
        self.decoder_cache: KVCache | None = None
        self.quantized: str | None = None  # "int8" after quantize_int8()

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (after loading weights into a `meta`-built model)."""
        device = self.codebook0_head.weight.device
        if device.type == "meta":
            return
        self.codebook_offsets = torch.arange(self.cfg.num_codebooks, device=device) * self.cfg.audio_vocab_size
        self.backbone.reset_rope()
        self.decoder.reset_rope()

    def setup_caches(self, slots: int, max_batch: int | None = None) -> None:
        """Allocate the backbone KV pool (`slots` sequences) and the per-frame depth-decoder cache."""
        p = self.codebook0_head.weight
        self.backbone_cache = KVCache(self.cfg.backbone, slots, p.dtype, p.device)
        self.decoder_cache = KVCache(self.cfg.decoder, max_batch or slots, p.dtype, p.device)

    def embed_rows(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens, mask [B, T, 33] -> [B, T, dim]: sum of the embeddings of the active columns."""
        audio = self.audio_embeddings(tokens[..., :-1] + self.codebook_offsets)  # [B, T, 32, dim]
        text = self.text_embeddings(tokens[..., -1])  # [B, T, dim]
        m = mask.to(audio.dtype)
        return (audio * m[..., :-1, None]).sum(2) + text * m[..., -1:]

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, 32] -> one audio row per stream [B, 1, dim]."""
        return self.audio_embeddings(codes + self.codebook_offsets).sum(1, keepdim=True)

    def backbone_forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, static: bool = False) -> torch.Tensor:
        assert self.backbone_cache is not None, "call setup_caches() first"
        return self.backbone(x, positions, self.backbone_cache, slots, static=static)

    def codebook0_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.codebook0_head(h)

    def decoder_forward(self, x: torch.Tensor, start: int | torch.Tensor, static: bool = False) -> torch.Tensor:
        """x [B, T, backbone dim] placed at depth positions start..start+T-1 -> [B, T, decoder dim].
        Stream b uses decoder cache row b; each frame starts again at position 0. static (with
        `start` a 0-dim tensor): every depth step runs the same (compiled) graph; eager, reading
        only the positions so far is faster."""
        assert self.decoder_cache is not None, "call setup_caches() first"
        B, T, _ = x.shape
        positions = (start + torch.arange(T, device=x.device)).expand(B, T)
        return self.decoder(self.projection(x), positions, self.decoder_cache, None, static=static)

    def depth_logits(self, h: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
        """Decoder output h [B, decoder dim] -> logits of codebook i (1..31) [B, audio vocab]."""
        if isinstance(i, int):
            return h @ self.audio_head[i - 1]
        return h @ self.audio_head.index_select(0, i.reshape(1) - 1)[0]  # a tensor i is never read on the host

    def embed_code(self, codes: torch.Tensor, codebook: int | torch.Tensor) -> torch.Tensor:
        """codes [B] of one codebook -> [B, 1, backbone dim]."""
        return self.audio_embeddings(codes + codebook * self.cfg.audio_vocab_size)[:, None]


def quantize_int8(model: CSM) -> CSM:
    """Dynamic int8 quantization of the transformers' and heads' linear layers (CPU only): a
    frame reads about a quarter of the fp32 bytes, and CPU decoding is memory-bound.
    Per-channel weight scales keep logits close to fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if model.codebook0_head.weight.device.type != "cpu" or model.codebook0_head.weight.dtype != torch.float32:
        raise ValueError("int8 quantization needs an fp32 model on the CPU")
    for name in ("backbone", "decoder"):
        setattr(model, name, quantize_dynamic(getattr(model, name), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8))
    model.quantized = "int8"
    return model
