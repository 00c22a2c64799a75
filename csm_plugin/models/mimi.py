"""Mimi neural audio codec (Kyutai): 24 kHz mono audio <-> 32 x 11-bit codes at 12.5 Hz.

One self-contained, inference-only implementation (no transformers/moshi import):

    audio [B,1,T] --SEANet encoder--> [B,512,T/960] (25 Hz) --transformer--> --stride-2 conv-->
    latent [B,512,F] (12.5 Hz) --split RVQ--> codes [B,32,F]

    codes --RVQ lookup + 1x1 proj--> [B,512,F] --stride-2 transposed conv--> [B,512,2F]
    --transformer--> --SEANet decoder--> audio [B,1,F*1920]

Everything is causal, so the decoder can stream: one 80 ms frame of codes in, exactly 1920
samples out, with all history held in a `MimiDecodeState` (conv input tails, transposed-conv
overlap tails, a sliding-window KV ring buffer). `decode` is literally `decode_step` on a fresh
state, so streaming and whole-sequence decoding cannot drift apart.

This file is the model only. Weights load from either public layout (transformers' or moshi's)
through mimi_loading.py (`mimi_from_state_dict`, `load_mimi`).
Internally module names mirror the transformers file keys, except that q/k/v are fused into one
`in_proj` (rotate-half RoPE order) and each RVQ group keeps its codebook vectors precomputed
(`embed_sum / cluster_usage`) in one stacked `codebooks` buffer.

Mimi always runs in fp32: its decoder transformer's residual stream is large enough that fp16
loses audible precision.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csm_plugin.errors import CheckpointError

from .csm import apply_rope, hf_rope_settings, rope_cos_sin, rope_inv_freq  # CSM's RoPE helpers

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms code frame
NUM_CODEBOOKS = 32  # CSM uses all 32 (Moshi itself only 8)
CODEBOOK_EPS = 1e-5  # clamp on cluster_usage; same value in moshi's and transformers' codebooks
_DECODE_CHUNK_FRAMES = 125  # whole-sequence decode works in 10 s chunks to bound activation memory


# --------------------------------------------------------------------------------------------
# config


@dataclass
class MimiConfig:
    """Architecture hyper-parameters. Field names mirror transformers' `MimiConfig`."""

    sampling_rate: int = 24000
    frame_rate: float = 12.5
    audio_channels: int = 1
    # SEANet
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    upsample_groups: int = 512
    # quantizer
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    # transformers (encoder and decoder share the architecture)
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    sliding_window: int = 250
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8000
    layer_scale_initial_scale: float = 0.01
    norm_eps: float = 1e-5

    # --- derived -----------------------------------------------------------------------------
    @property
    def hop_length(self) -> int:
        """Audio samples per SEANet latent step (960 = 25 Hz for the real model)."""
        return math.prod(self.upsampling_ratios)

    @property
    def latent_stride(self) -> int:
        """SEANet steps per code frame (2: the learnt 25 Hz <-> 12.5 Hz resampling)."""
        encodec_rate = math.ceil(self.sampling_rate / self.hop_length)
        return int(encodec_rate / self.frame_rate)

    @property
    def frame_size(self) -> int:
        return self.hop_length * self.latent_stride

    # --- constructors --------------------------------------------------------------------------
    @classmethod
    def full(cls) -> MimiConfig:
        """The released kyutai/mimi architecture, with all 32 codebooks (as CSM uses it)."""
        return cls()

    @classmethod
    def tiny(cls) -> MimiConfig:
        """Small widths/depths for fast CPU tests; keeps 24 kHz, 1920-sample frames and 32x2048 codes."""
        return cls(
            hidden_size=32,
            num_filters=4,
            upsample_groups=32,
            codebook_dim=16,
            vector_quantization_hidden_dimension=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            intermediate_size=64,
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MimiConfig:
        """Build from a transformers Mimi `config.json` dict (or a CSM config's `codec_config`).

        Unknown keys are ignored; settings this implementation does not support raise
        `CheckpointError` rather than silently producing a different model.
        """
        if "codec_config" in d and isinstance(d["codec_config"], dict):
            d = d["codec_config"]
        unsupported = {
            "use_causal_conv": True,
            "pad_mode": "constant",
            "trim_right_ratio": 1.0,
            "use_conv_shortcut": False,
            "attention_bias": False,
            "hidden_act": "gelu",
        }
        bad = [f"{k}={d[k]!r}" for k, want in unsupported.items() if k in d and d[k] != want]
        rope_type, rope_theta, _ = hf_rope_settings(d)
        if rope_type != "default":
            bad.append(f"rope_type={rope_type!r}")
        if bad:
            raise CheckpointError(f"unsupported Mimi config settings: {', '.join(bad)}")

        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        if rope_theta is not None:
            kw["rope_theta"] = float(rope_theta)
        kw.pop("frame_rate", None)
        kw["upsampling_ratios"] = list(kw.get("upsampling_ratios") or [8, 6, 5, 4])
        hidden = int(kw.get("hidden_size", cls.hidden_size))
        heads = int(kw.get("num_attention_heads", cls.num_attention_heads))
        kw.setdefault("head_dim", hidden // heads)
        kw.setdefault("codebook_dim", hidden)  # transformers' fallback when codebook_dim is null
        kw.setdefault("num_key_value_heads", heads)
        # transformers >= 5 derives the frame rate from the strides ("_frame_rate": null).
        frame_rate = d.get("frame_rate", d.get("_frame_rate"))
        cfg = cls(**kw)
        if frame_rate is None:
            frame_rate = cfg.sampling_rate / (cfg.hop_length * 2)
        cfg.frame_rate = float(frame_rate)
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict that `transformers.MimiConfig(**d)` accepts and that builds the same architecture."""
        d = asdict(self)
        d["upsampling_ratios"] = list(self.upsampling_ratios)
        d.pop("rope_theta")
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.update(
            model_type="mimi",
            use_causal_conv=True,
            pad_mode="constant",
            trim_right_ratio=1.0,
            use_conv_shortcut=False,
            attention_bias=False,
            hidden_act="gelu",
        )
        return d

    def validate(self) -> None:
        problems = []
        if self.latent_stride < 2:
            problems.append(f"frame_rate {self.frame_rate} must be below the SEANet rate (no resampling layer)")
        if self.num_semantic_quantizers >= self.num_quantizers:
            problems.append("num_semantic_quantizers must be < num_quantizers")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            problems.append("head_dim must be even (RoPE)")
        if problems:
            raise CheckpointError("invalid Mimi config: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# streaming state


@dataclass
class MimiDecodeState:
    """Everything the decoder remembers between `decode_step` calls, per row (stream).

    Rows are independent: row b of every tensor belongs to one stream only, so a server can
    batch streams that started at different times. Two ways to use it:
      * one row per batch entry: `decode_step(codes [B, K, F], state)` advances all B rows;
      * a pool: `state = mimi.decode_state(capacity)`, each stream owns a row, and
        `decode_step(codes [n, K, F], state, rows=LongTensor[n])` advances just those rows
        (codes[i] continues row rows[i]; rows not named are left untouched).
    To hand a row to a new stream (new utterance), `state.reset_(rows=...)` (or a bool mask).
    All updates are in place, so tensor addresses stay fixed (CUDA-graph friendly).
    """

    conv_tails: list[Tensor]  # per causal conv: last (k_eff - 1) inputs, [B, C_in, k_eff - 1]
    convtr_tails: list[Tensor]  # per transposed conv: overlap-add tail (no bias), [B, C_out, k - s]
    k_cache: Tensor  # [L, B, KVH, W, D] ring buffer, slot = position % W
    v_cache: Tensor  # [L, B, KVH, W, D]
    kv_pos: Tensor  # [B, W] absolute position held in each ring slot, -1 = empty
    pos: Tensor  # [B] next latent-step (25 Hz) position

    @property
    def batch_size(self) -> int:
        """Number of rows (the pool's capacity)."""
        return self.pos.shape[0]

    def reset_(self, mask: Tensor | None = None, *, rows: Tensor | list[int] | None = None) -> MimiDecodeState:
        """Reset rows to a fresh (silent-history) state, in place.

        `mask` ([B] bool) selects rows where True; `rows` (integer indices) selects rows by
        number; neither resets every row.
        """
        if mask is not None and rows is not None:
            raise ValueError("pass either mask or rows to reset_, not both")
        if rows is not None:
            idx = _check_rows(rows, self.batch_size, self.pos.device)
            mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.pos.device)
            mask[idx] = True
        elif mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.pos.device)
        mask = mask.to(self.pos.device, torch.bool)
        if mask.shape != (self.batch_size,):
            raise ValueError(f"mask must have shape [{self.batch_size}], got {tuple(mask.shape)}")
        for t in [*self.conv_tails, *self.convtr_tails]:
            t.masked_fill_(mask.view(-1, 1, 1), 0.0)
        self.k_cache.masked_fill_(mask.view(1, -1, 1, 1, 1), 0.0)
        self.v_cache.masked_fill_(mask.view(1, -1, 1, 1, 1), 0.0)
        self.kv_pos.masked_fill_(mask.view(-1, 1), -1)
        self.pos.masked_fill_(mask, 0)
        return self


def _check_rows(rows: Tensor | list[int], capacity: int, device: torch.device, n: int | None = None) -> Tensor:
    """`rows` as a long tensor on `device`, once checked to name distinct rows of a `capacity`-row state.

    Reads the indices on the host (a sync on GPU): a bad index would otherwise corrupt another
    stream's row silently (index_copy_ with duplicates keeps an arbitrary one).
    """
    if isinstance(rows, Tensor):
        r = rows
    else:
        values = list(rows)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"rows must be integer row indices, got {values[:10]}")
        r = torch.tensor(values, dtype=torch.long)
    if r.dim() != 1 or r.dtype == torch.bool or r.is_floating_point() or r.is_complex():
        raise ValueError(f"rows must be a 1-D tensor of integer row indices, got shape {tuple(r.shape)} {r.dtype}")
    if n is not None and r.numel() != n:
        raise ValueError(f"rows has {r.numel()} entries but codes hold {n} streams (codes.shape[0])")
    values = r.tolist()
    bad = [v for v in values if not 0 <= v < capacity]
    if bad:
        raise ValueError(f"rows {bad[:10]} out of range for a state with {capacity} rows (0..{capacity - 1})")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"rows {dup[:10]} named more than once: each stream needs its own row")
    return r.to(device, torch.long)


def _read_rows(t: Tensor, rows: Tensor | None) -> Tensor:
    """State tensor t [B, ...] restricted to `rows`: t itself if None, else a gathered copy [n, ...]."""
    return t if rows is None else t.index_select(0, rows)


def _write_rows_(t: Tensor, rows: Tensor | None, value: Tensor) -> None:
    """In place: t = value (rows None) or t[rows] = value; value is [n, ...]."""
    if rows is None:
        t.copy_(value)
    else:
        t.index_copy_(0, rows, value)


# --------------------------------------------------------------------------------------------
# GEMMs for the streaming decoder
#
# A decode step is a handful of rows per stream (2 latent steps per frame, then 16, 96, 480 as
# SEANet upsamples) against ~160 MB of fp32 weights, so on CPU it is bound by how fast each GEMM
# streams its weight. Measured on a 2-core AMD EPYC (torch 2.13, MKL + oneDNN; bench/mimi_decode.py):
#   * F.linear's x @ w.T and conv1d/conv_transpose1d stream only 5-9 GB/s with M <= 4 rows, while
#     MKL runs the same product as w @ x.T at 20-27 GB/s, about the memory bandwidth;
#   * from ~8 rows on, oneDNN's matmul (the kernel inductor uses for CPU linears) beats MKL's.
# Results equal F.linear's up to float rounding. MKL's w @ x.T rounds differently depending on the
# weight's address, which is why `mimi_from_state_dict` gives every weight its own aligned storage.
_MM_MAX_ROWS = 4  # up to this many rows: w @ x.T
_GEMM_CONV_MAX_ROWS = 64  # decoder convs with at most this many output steps (x streams) run as one GEMM


def _onednn_linear_op():
    """torch.ops.mkldnn._linear_pointwise if this torch build has a working one, else None."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        op(torch.zeros(1, 1), torch.zeros(1, 1), None, "none", [], "")
        return op
    except Exception:  # noqa: BLE001 - a build without oneDNN, or a renamed private op
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def _decode_linear(x: Tensor, w: Tensor) -> Tensor:
    """F.linear(x, w) without bias, x [..., in], w [out, in] (contiguous) -> [..., out], fast for few rows."""
    if x.device.type != "cpu":
        return F.linear(x, w)
    M = x.numel() // x.shape[-1]
    x2 = x.reshape(M, x.shape[-1]).contiguous()  # [M, in]; w @ x2.T is only fast with x2 contiguous
    if M <= _MM_MAX_ROWS:
        y = torch.mm(w, x2.t()).t().contiguous()
    elif _ONEDNN_LINEAR is not None:
        y = _ONEDNN_LINEAR(x2, w, None, "none", [], "")
    else:
        y = F.linear(x2, w)
    return y.view(*x.shape[:-1], w.shape[0])


# --------------------------------------------------------------------------------------------
# layers


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only; `.conv` keeps the checkpoint's weight names."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, dilation=1, groups=1, bias=True, pad_mode="constant"):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride, dilation=dilation, groups=groups, bias=bias)
        self.stride = stride
        self.pad = (kernel_size - 1) * dilation + 1 - stride  # left context the conv needs
        self.pad_mode = pad_mode
        self.slot = -1  # index into MimiDecodeState.conv_tails (decoder convs only)

    def forward(self, x: Tensor) -> Tensor:
        # Offline: left-pad for causality, right-pad the last partial stride (zeros, or the edge
        # value in replicate mode) exactly as moshi/transformers do, so codes match theirs.
        extra = (-x.shape[-1]) % self.stride
        if self.pad_mode == "replicate":
            x = F.pad(x, (self.pad, extra), mode="replicate")
        else:
            x = F.pad(x, (self.pad, extra))
        return self.conv(x)

    def step(self, x: Tensor, state: MimiDecodeState, rows: Tensor | None = None) -> Tensor:
        # Streaming (stride 1 in the decoder): prepend the remembered inputs instead of zeros.
        # x [B, C_in, T] -> [B, C_out, T]; batch entry b continues state row rows[b].
        if self.pad > 0:
            tail = state.conv_tails[self.slot]  # [B_state, C_in, pad]
            x = torch.cat([_read_rows(tail, rows), x], dim=-1)  # [B, C_in, pad + T]
            _write_rows_(tail, rows, x[..., -self.pad :])
        c = self.conv
        B, C_in, T = x.shape[0], x.shape[1], x.shape[2] - self.pad
        if c.groups > 1 or B * T > _GEMM_CONV_MAX_ROWS or x.device.type != "cpu":
            return c(x)
        # Few output steps (the first conv sees 2 per stream): im2col + one GEMM, ~3x faster on
        # CPU than conv1d here (see _decode_linear).
        k, d = c.kernel_size[0], c.dilation[0]
        cols = x.unfold(2, self.pad + 1, 1)[..., ::d]  # [B, C_in, T, k]: x[b, c, t + j*d]
        cols = cols.permute(0, 2, 1, 3).reshape(B, T, C_in * k)
        y = _decode_linear(cols, c.weight.view(c.out_channels, C_in * k)).transpose(1, 2)  # [B, C_out, T]
        return y if c.bias is None else y + c.bias[:, None]


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d trimmed on the right, with the trimmed overlap carried to the next call.

    A transposed conv spreads each input step over `kernel` outputs; the last (kernel - stride)
    of them overlap the next step's outputs. Offline they are trimmed at the very end; streaming,
    they are kept (without bias) and added to the head of the next chunk. Each call therefore emits
    exactly stride * T_in samples, and the concatenation equals the offline result.
    """

    def __init__(self, c_in, c_out, kernel_size, stride, groups=1, bias=True):
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel_size, stride, groups=groups, bias=bias)
        self.stride = stride
        self.overlap = kernel_size - stride
        self.slot = -1  # index into MimiDecodeState.convtr_tails

    def gemm_weight(self) -> Tensor:
        """The weight [C_in, C_out, k] as a GEMM operand [C_out * k, C_in].

        A free view once `use_gemm_layout_` has run (what `mimi_from_state_dict` does), else a copy.
        """
        return self.conv.weight.permute(1, 2, 0).reshape(-1, self.conv.in_channels)

    @torch.no_grad()
    def use_gemm_layout_(self) -> None:
        """Store the weight in [C_out, k, C_in] memory order; same shape, values and state_dict."""
        w = self.conv.weight
        self.conv.weight = nn.Parameter(w.permute(1, 2, 0).contiguous().permute(2, 0, 1), w.requires_grad)

    def step(self, x: Tensor, state: MimiDecodeState, rows: Tensor | None = None) -> Tensor:
        # x [B, C_in, T] -> [B, C_out, T * stride]; batch entry b continues state row rows[b].
        c, s = self.conv, self.stride
        B, _, T = x.shape
        tail = state.convtr_tails[self.slot]  # [B_state, C_out, overlap]
        if c.groups == 1 and self.overlap == s:
            # kernel = 2 * stride (every Mimi SEANet layer): one GEMM gives each input step's two
            # stride-long halves; output step t = first half of t + second half of t-1. Much faster
            # on CPU than conv_transpose1d, which takes a slow path for the big first layer.
            C_out = c.out_channels
            z = _decode_linear(x.transpose(1, 2), self.gemm_weight()).view(B, T, C_out, 2, s)
            head, rest = z[:, :, :, 0], z[:, :, :, 1]  # [B, T, C_out, s]
            prev = torch.cat([_read_rows(tail, rows)[:, None], rest[:, :-1]], dim=1)
            _write_rows_(tail, rows, rest[:, -1])
            y = (head + prev).permute(0, 2, 1, 3).reshape(B, C_out, T * s)
        else:
            y = F.conv_transpose1d(x, c.weight, None, s, groups=c.groups)  # [B, C, T*s + overlap]
            n = T * s
            y[..., : self.overlap] += _read_rows(tail, rows)
            _write_rows_(tail, rows, y[..., n:])
            y = y[..., :n]
        if c.bias is not None:
            y = y + c.bias[:, None]
        return y


class ResnetBlock(nn.Module):
    """SEANet residual unit: x + conv1(elu(conv_k(elu(x)))); `block` indices match the checkpoint."""

    def __init__(self, cfg: MimiConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation),
                nn.ELU(),
                CausalConv1d(hidden, dim, 1),
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block[3](F.elu(self.block[1](F.elu(x))))

    def step(self, x: Tensor, state: MimiDecodeState, rows: Tensor | None = None) -> Tensor:
        return x + self.block[3].step(F.elu(self.block[1].step(F.elu(x), state, rows)), state, rows)


def _seanet_layout(cfg: MimiConfig, decoder: bool) -> list[str]:
    """Layer kinds in checkpoint index order ('conv', 'convtr', 'res', 'elu')."""
    kinds = ["conv"]
    for _ in cfg.upsampling_ratios:
        if decoder:
            kinds += ["elu", "convtr"] + ["res"] * cfg.num_residual_layers
        else:
            kinds += ["res"] * cfg.num_residual_layers + ["elu", "conv"]
    return kinds + ["elu", "conv"]


class SEANetEncoder(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size)]
        ch = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            layers += [ResnetBlock(cfg, ch, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
            layers += [nn.ELU(), CausalConv1d(ch, ch * 2, ratio * 2, stride=ratio)]
            ch *= 2
        layers += [nn.ELU(), CausalConv1d(ch, cfg.hidden_size, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, hidden, ceil(T / hop)]
        for layer in self.layers:
            x = layer(x)
        return x


class SEANetDecoder(nn.Module):
    def __init__(self, cfg: MimiConfig):
        super().__init__()
        ch = cfg.num_filters * 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.hidden_size, ch, cfg.kernel_size)]
        for ratio in cfg.upsampling_ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(ch, ch // 2, ratio * 2, stride=ratio)]
            layers += [ResnetBlock(cfg, ch // 2, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
            ch //= 2
        layers += [nn.ELU(), CausalConv1d(ch, cfg.audio_channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def step(self, x: Tensor, state: MimiDecodeState, rows: Tensor | None = None) -> Tensor:
        # [n, hidden, T] -> [n, C, T * hop]
        for layer in self.layers:
            x = F.elu(x) if isinstance(layer, nn.ELU) else layer.step(x, state, rows)
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))


class MLP(nn.Module):
    def __init__(self, cfg: MimiConfig, linear=F.linear):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(F.gelu(self.linear(x, self.fc1.weight)), self.fc2.weight)


def _window_mask(pos: Tensor, key_pos: Tensor, window: int) -> Tensor:
    """[B, T, S] bool: a query at p sees keys at p - window < p' <= p (key_pos -1 = empty slot)."""
    delta = pos[:, :, None] - key_pos[:, None, :]
    return (delta >= 0) & (delta < window) & (key_pos[:, None, :] >= 0)


class _StepCache(NamedTuple):
    """What one decoder layer uses from the state in one `decode_step` call (B = streams in the call)."""

    k: Tensor  # [B_state, KVH, W, D] this layer's key ring, all rows
    v: Tensor  # [B_state, KVH, W, D]
    rows: Tensor | None  # [B] state row of each batch entry; None = all rows, in order
    idx: Tensor  # [B] state row of each batch entry as indices (arange(B) when rows is None)
    bias: Tensor  # [B, 1, 1, T, W + T] 0 or -inf: the window mask over [ring | this call's keys]


class Attention(nn.Module):
    def __init__(self, cfg: MimiConfig, linear=F.linear):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        # q|k|v fused into one matmul; q/k rows in rotate-half order.
        self.in_proj = nn.Linear(cfg.hidden_size, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.linear = linear

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, cache: _StepCache | None) -> Tensor:
        B, T, _ = x.shape
        H, KVH, D = self.n_head, self.n_kv, self.head_dim
        qkv = self.linear(x, self.in_proj.weight)  # [B, T, (H + 2 * KVH) * D]
        qk = qkv[..., : (H + KVH) * D].unflatten(-1, (H + KVH, D))  # [B, T, H + KVH, D]
        qk = apply_rope(qk, cos, sin)  # on q and k at once (cos, sin [B, T, 1, D])
        q, k = qk.transpose(1, 2).split([H, KVH], dim=1)  # [B, H, T, D], [B, KVH, T, D]
        v = qkv[..., (H + KVH) * D :].unflatten(-1, (KVH, D)).transpose(1, 2)  # [B, KVH, T, D]
        if cache is None:
            y = self._attend(q, k, v, pos)
        else:
            y = self._attend_cached(q, k, v, cache)
            # Only the newest W steps can ever be attended again; write them into the ring.
            W = cache.k.shape[2]
            n = min(T, W)
            slots = pos[:, T - n :] % W  # [B, n]
            cache.k[cache.idx[:, None], :, slots] = k[:, :, T - n :].transpose(1, 2)  # [B, n, KVH, D]
            cache.v[cache.idx[:, None], :, slots] = v[:, :, T - n :].transpose(1, 2)
        return self.linear(y.transpose(1, 2).reshape(B, T, H * D), self.o_proj.weight)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        # Offline (encoder): the whole sequence at once.
        mask = _window_mask(pos, pos, self.window)
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: _StepCache) -> Tensor:
        # Streaming: keys are the ring (W slots) followed by this call's T steps. Scores against
        # each part are computed separately, so the ring is read in place instead of being
        # concatenated (copied) with the new keys on every layer.
        kc, vc = _read_rows(cache.k, cache.rows), _read_rows(cache.v, cache.rows)  # [B, KVH, W, D]
        B, H, T, D = q.shape
        KVH, W = kc.shape[1], kc.shape[2]
        G = H // KVH
        qg = (q * D**-0.5).reshape(B, KVH, G * T, D)  # the G heads sharing a kv head, stacked
        scores = torch.cat([qg @ kc.transpose(-1, -2), qg @ k.transpose(-1, -2)], dim=-1)  # [B, KVH, G*T, W+T]
        p = (scores.view(B, KVH, G, T, W + T) + cache.bias).softmax(dim=-1).view(B, KVH, G * T, W + T)
        y = p[..., :W] @ vc + p[..., W:] @ v  # [B, KVH, G*T, D]
        return y.view(B, H, T, D)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: MimiConfig, linear=F.linear):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg, linear)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, linear)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x, cos, sin, pos, cache=None):
        x = x + self.self_attn_layer_scale.scale * self.self_attn(self.input_layernorm(x), cos, sin, pos, cache)
        return x + self.mlp_layer_scale.scale * self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """`linear` computes every projection: F.linear (encoder), `_decode_linear` (streaming decoder)."""

    def __init__(self, cfg: MimiConfig, linear=F.linear):
        super().__init__()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList([TransformerLayer(cfg, linear) for _ in range(cfg.num_hidden_layers)])

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        inv_freq: Tensor,
        state: MimiDecodeState | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        # x [B, T, C], pos [B, T] absolute latent positions (per stream). With a state, batch
        # entry b continues state row rows[b] (row b if rows is None).
        cos, sin = rope_cos_sin(pos.float(), inv_freq)  # [B, T, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D]: one angle for all heads
        if state is None:
            for layer in self.layers:
                x = layer(x, cos, sin, pos)
            return x

        B, T = pos.shape
        W = state.kv_pos.shape[1]
        # One window mask for all layers: they share the ring's positions.
        key_pos = torch.cat([_read_rows(state.kv_pos, rows), pos], dim=1)  # [B, W + T]
        bias = torch.zeros(B, 1, 1, T, W + T, device=x.device)
        bias.masked_fill_(~_window_mask(pos, key_pos, self.window)[:, None, None], float("-inf"))
        idx = torch.arange(B, device=x.device) if rows is None else rows
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, pos, _StepCache(state.k_cache[i], state.v_cache[i], rows, idx, bias))
        n = min(T, W)
        state.kv_pos[idx[:, None], pos[:, -n:] % W] = pos[:, -n:]
        return x


class ResidualVQ(nn.Module):
    """One RVQ group: 1x1 projection into the codebook space, `n` residual codebooks, projection out."""

    def __init__(self, cfg: MimiConfig, n: int):
        super().__init__()
        self.n = n
        dim = cfg.vector_quantization_hidden_dimension
        self.input_proj = nn.Conv1d(cfg.hidden_size, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, cfg.hidden_size, 1, bias=False)
        # embed_sum / cluster_usage, computed once at load: [n, codebook_size, codebook_dim]
        self.register_buffer("codebooks", torch.zeros(n, cfg.codebook_size, cfg.codebook_dim))

    def encode(self, x: Tensor) -> Tensor:  # [B, hidden, F] -> [B, n, F]
        residual = self.input_proj(x).transpose(1, 2)  # [B, F, dim]
        B, Fr, Dm = residual.shape
        residual = residual.reshape(B * Fr, Dm)
        codes = []
        for cb in self.codebooks:
            # torch.cdist like both references, so near-ties resolve the same way.
            idx = torch.cdist(residual[None], cb[None], p=2)[0].argmin(dim=-1)
            residual = residual - cb[idx]
            codes.append(idx.view(B, Fr))
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:  # [B, k, F] (k <= n) -> [B, hidden, F]
        k = codes.shape[1]
        N = self.codebooks.shape[1]
        offsets = torch.arange(k, device=codes.device)[None, :, None] * N
        vecs = F.embedding(codes + offsets, self.codebooks[:k].flatten(0, 1))  # [B, k, F, dim]
        w = self.output_proj.weight  # [hidden, dim, 1]: a 1x1 conv, i.e. a linear map
        return _decode_linear(vecs.sum(dim=1), w.view(w.shape[0], w.shape[1])).transpose(1, 2)


class SplitRVQ(nn.Module):
    """Semantic group (1 codebook) + acoustic group (31), each projecting the same latent."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        self.n_semantic = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVQ(cfg, cfg.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualVQ(cfg, cfg.num_quantizers - cfg.num_semantic_quantizers)

    def encode(self, x: Tensor) -> Tensor:
        return torch.cat(
            [self.semantic_residual_vector_quantizer.encode(x), self.acoustic_residual_vector_quantizer.encode(x)],
            dim=1,
        )

    def decode(self, codes: Tensor) -> Tensor:
        out = self.semantic_residual_vector_quantizer.decode(codes[:, : self.n_semantic])
        if codes.shape[1] > self.n_semantic:
            out = out + self.acoustic_residual_vector_quantizer.decode(codes[:, self.n_semantic :])
        return out


# --------------------------------------------------------------------------------------------
# model


class Mimi(nn.Module):
    """Mimi codec, fp32, inference only. Build with mimi_loading's `load_mimi` / `mimi_from_state_dict`.

        codes = mimi.encode(wav)                 # [B, 1, T] -> [B, 32, ceil(T / 1920)]
        audio = mimi.decode(codes)               # [B, K, F] -> [B, 1, F * 1920]
        state = mimi.decode_state(batch_size=B)  # streaming: per-stream history
        chunk = mimi.decode_step(codes[..., i:i+1], state)  # -> [B, 1, 1920], advances state
        state.reset_(mask)                       # restart the streams where mask is True

        pool = mimi.decode_state(capacity)       # a pool: each stream owns a row
        pool.reset_(rows=[r])                    # hand row r to a new stream
        chunks = mimi.decode_step(codes_n, pool, rows=rows_n)  # [n, K, F], rows_n [n] -> [n, 1, F * 1920]
    """

    def __init__(self, config: MimiConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        s = cfg.latent_stride
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        self.downsample = CausalConv1d(
            cfg.hidden_size, cfg.hidden_size, 2 * s, stride=s, bias=False, pad_mode="replicate"
        )
        self.quantizer = SplitRVQ(cfg)
        self.upsample = CausalConvTranspose1d(
            cfg.hidden_size, cfg.hidden_size, 2 * s, stride=s, groups=cfg.upsample_groups, bias=False
        )
        self.decoder_transformer = Transformer(cfg, linear=_decode_linear)
        self.decoder = SEANetDecoder(cfg)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, None), persistent=False)

        # Number the decoder's stateful convs: their index into MimiDecodeState's tail lists.
        self._convs = [m for m in self.decoder.modules() if isinstance(m, CausalConv1d) and m.pad > 0]
        self._convtrs = [self.upsample] + [m for m in self.decoder.modules() if isinstance(m, CausalConvTranspose1d)]
        for i, m in enumerate(self._convs):
            m.slot = i
        for i, m in enumerate(self._convtrs):
            m.slot = i

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        """[B, 1, T] float at 24 kHz -> codes [B, num_quantizers, ceil(T / 1920)] (int64).

        A trailing partial frame is zero-padded inside each strided conv, exactly as moshi and
        transformers do, so codes match theirs for any length.
        """
        if wav.dim() != 3 or wav.shape[1] != self.config.audio_channels:
            raise ValueError(f"expected wav of shape [B, {self.config.audio_channels}, T], got {tuple(wav.shape)}")
        if wav.shape[-1] == 0:
            raise ValueError("cannot encode empty audio")
        x = self.encoder(wav.to(self.device, torch.float32))  # [B, hidden, T/hop]
        B, _, T = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        x = self.encoder_transformer(x.transpose(1, 2), pos, self.inv_freq).transpose(1, 2)
        return self.quantizer.encode(self.downsample(x))

    def decode_state(self, batch_size: int = 1) -> MimiDecodeState:
        """A fresh (silent-history) streaming state for `batch_size` independent streams."""
        cfg, dev, B = self.config, self.device, batch_size
        W, L = cfg.sliding_window, cfg.num_hidden_layers
        zeros = lambda *shape: torch.zeros(*shape, device=dev, dtype=torch.float32)  # noqa: E731
        return MimiDecodeState(
            conv_tails=[zeros(B, m.conv.in_channels, m.pad) for m in self._convs],
            convtr_tails=[zeros(B, m.conv.out_channels, m.overlap) for m in self._convtrs],
            k_cache=zeros(L, B, cfg.num_key_value_heads, W, cfg.head_dim),
            v_cache=zeros(L, B, cfg.num_key_value_heads, W, cfg.head_dim),
            kv_pos=torch.full((B, W), -1, dtype=torch.long, device=dev),
            pos=torch.zeros(B, dtype=torch.long, device=dev),
        )

    @torch.no_grad()
    def decode_step(self, codes: Tensor, state: MimiDecodeState, rows: Tensor | list[int] | None = None) -> Tensor:
        """Decode the next frames of n streams: codes [n, K, F] -> audio [n, 1, F * 1920].

        rows None: n == state.batch_size and codes[b] continues row b. Otherwise `rows` ([n]
        distinct integer indices into the state) says which row each codes[i] continues; only
        those rows are read and advanced, the others stay untouched (a pooled state shared by
        streams that come and go). Bad rows (out of range, repeated, not one per codes row)
        raise ValueError; they are checked on the host.

        Advances `state` in place. No look-ahead: the output for a frame never changes once
        emitted, and any split of a sequence into calls yields the same samples as `decode`.
        Codes outside 0..codebook_size-1 (CSM's special tokens 2048..2050) are clamped.
        """
        if codes.dim() != 3:
            raise ValueError(f"expected codes [n, K, F], got {tuple(codes.shape)}")
        if rows is None:
            if codes.shape[0] != state.batch_size:
                raise ValueError(f"expected codes [B={state.batch_size}, K, F], got {tuple(codes.shape)}")
        else:
            rows = _check_rows(rows, state.batch_size, state.pos.device, n=codes.shape[0])
        if not 1 <= codes.shape[1] <= self.config.num_quantizers:
            raise ValueError(f"expected 1..{self.config.num_quantizers} codebooks, got {codes.shape[1]}")
        if codes.shape[0] == 0:  # no stream to advance this frame
            cfg = self.config
            return torch.zeros(0, cfg.audio_channels, codes.shape[-1] * cfg.frame_size, device=self.device)
        return self.decode_rows(codes.to(self.device, torch.long), state, rows)

    @torch.no_grad()
    def decode_rows(self, codes: Tensor, state: MimiDecodeState, rows: Tensor | None) -> Tensor:
        """`decode_step` without its checks and host syncs, for callers that built `rows` themselves
        (a CUDA graph can capture it): codes [n, K, F] long on this device, rows [n] or None. A
        row named more than once ends in an undefined state (fine for a scratch row, as padding)."""
        codes = codes.clamp(0, self.config.codebook_size - 1)
        x = self.quantizer.decode(codes)  # [n, hidden, F]
        x = self.upsample.step(x, state, rows)  # [n, hidden, F * stride]
        T = x.shape[-1]
        start = _read_rows(state.pos, rows)  # [n]
        pos = start[:, None] + torch.arange(T, device=x.device)  # [n, T]
        x = self.decoder_transformer(x.transpose(1, 2), pos, self.inv_freq, state, rows).transpose(1, 2)
        _write_rows_(state.pos, rows, start + T)
        return self.decoder.step(x, state, rows)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Whole-sequence decode: codes [B, K, F] -> audio [B, 1, F * 1920]."""
        state = self.decode_state(codes.shape[0])
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], self.config.audio_channels, 0, device=self.device)
        chunks = [self.decode_step(c, state) for c in codes.split(_DECODE_CHUNK_FRAMES, dim=-1)]
        return torch.cat(chunks, dim=-1)


__all__ = [
    "SAMPLE_RATE",
    "FRAME_SIZE",
    "NUM_CODEBOOKS",
    "MimiConfig",
    "MimiDecodeState",
    "Mimi",
]
