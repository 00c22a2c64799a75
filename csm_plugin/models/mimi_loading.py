"""Mimi checkpoints: the two public weight layouts, strict loading into mimi.py's `Mimi`, random
weights for tests and benches, and finding the files (local path or Hugging Face hub).

Layouts (detected from the keys):
  * transformers (`kyutai/mimi` model.safetensors, or `codec_model.*` inside a CSM checkpoint):
    separate q/k/v projections in rotate-half RoPE order, codebooks as embed_sum + cluster_usage;
  * moshi (`tokenizer-e351c8d8-checkpoint125.safetensors`): moshi's module names, q/k/v fused
    into one `in_proj_weight`, q/k rows in interleaved RoPE order.
Both are mapped onto the transformers names, then onto Mimi's own (fused `in_proj`, precomputed
`codebooks`). The q/k row permutation and the hub download are loading.py's, shared with CSM.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .csm import rope_inv_freq
from .loading import hub_download, interleaved_to_rotate_half, rotate_half_to_interleaved
from .mimi import CODEBOOK_EPS, Mimi, MimiConfig, _seanet_layout

DEFAULT_REPO = "kyutai/mimi"
MIMI_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]  # a hub repo's files load_mimi reads


# --------------------------------------------------------------------------------------------
# checkpoint layouts


_IGNORABLE = re.compile(r"(^|\.)(_?initialized|rotary_emb\.inv_freq|_embedding)$")


def _hf_shapes(cfg: MimiConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers-layout Mimi checkpoint, with its shape."""
    with torch.device("meta"):
        model = Mimi(cfg)
    out: dict[str, tuple[int, ...]] = {}
    hd, hidden = cfg.head_dim, cfg.hidden_size
    for name, t in model.state_dict().items():
        if name.endswith("self_attn.in_proj.weight"):
            p = name[: -len("in_proj.weight")]
            out[p + "q_proj.weight"] = (cfg.num_attention_heads * hd, hidden)
            out[p + "k_proj.weight"] = (cfg.num_key_value_heads * hd, hidden)
            out[p + "v_proj.weight"] = (cfg.num_key_value_heads * hd, hidden)
        elif name.endswith(".codebooks"):
            p = name[: -len("codebooks")]
            n, N, D = t.shape
            for j in range(n):
                out[f"{p}layers.{j}.codebook.embed_sum"] = (N, D)
                out[f"{p}layers.{j}.codebook.cluster_usage"] = (N,)
                out[f"{p}layers.{j}.codebook.initialized"] = (1,)
        else:
            out[name] = tuple(t.shape)
    return out


def _hf_to_moshi_name(name: str, cfg: MimiConfig) -> str:
    """Rename one transformers key to moshi's (q/k/v handled by the caller)."""
    m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.(.*)$", name)
    if m:
        part, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        kind = _seanet_layout(cfg, decoder=part == "decoder")[idx]
        if kind == "res":
            rest = re.sub(r"^block\.(\d+)\.conv\.", r"block.\1.conv.conv.", rest)
        elif kind == "convtr":
            rest = rest.replace("conv.", "convtr.convtr.", 1)
        else:
            rest = rest.replace("conv.", "conv.conv.", 1)
        return f"{part}.model.{idx}.{rest}"
    if name.startswith("downsample.conv."):
        return name.replace("downsample.conv.", "downsample.conv.conv.conv.", 1)
    if name.startswith("upsample.conv."):
        return name.replace("upsample.conv.", "upsample.convtr.convtr.convtr.", 1)
    m = re.match(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.*)$", name)
    if m:
        rest = {
            "self_attn.o_proj.weight": "self_attn.out_proj.weight",
            "input_layernorm.weight": "norm1.weight",
            "input_layernorm.bias": "norm1.bias",
            "post_attention_layernorm.weight": "norm2.weight",
            "post_attention_layernorm.bias": "norm2.bias",
            "mlp.fc1.weight": "linear1.weight",
            "mlp.fc2.weight": "linear2.weight",
            "self_attn_layer_scale.scale": "layer_scale_1.scale",
            "mlp_layer_scale.scale": "layer_scale_2.scale",
        }[m.group(3)]
        return f"{m.group(1)}_transformer.transformer.layers.{m.group(2)}.{rest}"
    m = re.match(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(.*)$", name)
    if m:
        group = "rvq_first" if m.group(1) == "semantic" else "rvq_rest"
        rest = m.group(2)
        cb = re.match(r"layers\.(\d+)\.codebook\.(embed_sum|cluster_usage|initialized)$", rest)
        if cb:
            leaf = {"embed_sum": "embedding_sum", "cluster_usage": "cluster_usage", "initialized": "_initialized"}
            return f"quantizer.{group}.vq.layers.{cb.group(1)}._codebook.{leaf[cb.group(2)]}"
        return f"quantizer.{group}.{rest}"
    raise KeyError(name)




def _moshi_plan(cfg: MimiConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Expected moshi tensors with shapes, and the moshi -> transformers name map (in_proj -> prefix)."""
    shapes, to_hf = {}, {}
    for name, shape in _hf_shapes(cfg).items():
        m = re.match(r"((?:encoder|decoder)_transformer)\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            if m.group(3) == "q":
                key = f"{m.group(1)}.transformer.layers.{m.group(2)}.self_attn.in_proj_weight"
                rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
                shapes[key] = (rows, cfg.hidden_size)
                to_hf[key] = name[: -len("q_proj.weight")]
            continue
        key = _hf_to_moshi_name(name, cfg)
        shapes[key] = shape
        to_hf[key] = name
    return shapes, to_hf


def _check_keys(sd: dict[str, Tensor], expected: dict[str, tuple[int, ...]], layout: str) -> None:
    missing = [k for k in expected if k not in sd and not _IGNORABLE.search(k)]
    unexpected = [k for k in sd if k not in expected and not _IGNORABLE.search(k)]
    misshaped = [
        f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{label}: {', '.join(sorted(items)[:10])}{more}")
    if problems:
        raise CheckpointError(f"Mimi checkpoint ({layout} layout) does not match the config: " + "; ".join(problems))


def _is_moshi_layout(sd: dict[str, Tensor]) -> bool:
    moshi_prefixes = ("encoder.model.", "decoder.model.", "quantizer.rvq_")
    return any(k.startswith(moshi_prefixes) or k.endswith("in_proj_weight") for k in sd)


def _moshi_to_hf(sd: dict[str, Tensor], cfg: MimiConfig) -> dict[str, Tensor]:
    shapes, to_hf = _moshi_plan(cfg)
    _check_keys(sd, shapes, "moshi")
    hd = cfg.head_dim
    out = {}
    for key, t in sd.items():
        if key not in to_hf:
            continue  # an ignorable extra
        if key.endswith("in_proj_weight"):
            kv = cfg.num_key_value_heads * hd
            q, k, v = t.split([cfg.num_attention_heads * hd, kv, kv])
            p = to_hf[key]
            out[p + "q_proj.weight"] = interleaved_to_rotate_half(q, cfg.num_attention_heads)
            out[p + "k_proj.weight"] = interleaved_to_rotate_half(k, cfg.num_key_value_heads)
            out[p + "v_proj.weight"] = v
        else:
            out[to_hf[key]] = t
    return out


def to_moshi_state_dict(hf_state_dict: dict[str, Tensor], config: MimiConfig) -> dict[str, Tensor]:
    """transformers layout -> moshi layout (fused in_proj, interleaved RoPE rows, moshi names)."""
    out = {}
    for name, t in hf_state_dict.items():
        m = re.match(r"((?:encoder|decoder)_transformer)\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$", name)
        if m:
            if m.group(3) == "q":
                p = name[: -len("q_proj.weight")]
                q = rotate_half_to_interleaved(t, config.num_attention_heads)
                k = rotate_half_to_interleaved(hf_state_dict[p + "k_proj.weight"], config.num_key_value_heads)
                v = hf_state_dict[p + "v_proj.weight"]
                out[f"{m.group(1)}.transformer.layers.{m.group(2)}.self_attn.in_proj_weight"] = torch.cat([q, k, v])
            continue
        out[_hf_to_moshi_name(name, config)] = t
    return out


def mimi_from_state_dict(state_dict: dict[str, Tensor], config: MimiConfig) -> Mimi:
    """Build a CPU fp32 `Mimi` from a transformers- or moshi-layout state dict (detected from keys).

    Strict: missing, unexpected or misshaped tensors raise `CheckpointError` naming them
    (`initialized` flags and unpersisted buffers are tolerated).
    """
    config.validate()
    if _is_moshi_layout(state_dict):
        sd = _moshi_to_hf(state_dict, config)
    else:
        _check_keys(state_dict, _hf_shapes(config), "transformers")
        sd = state_dict
    bad = [k for k, t in sd.items() if not t.is_floating_point()]
    if bad:
        raise CheckpointError(f"Mimi checkpoint tensors must be floating point: {', '.join(sorted(bad)[:10])}")

    internal: dict[str, Tensor] = {}
    for name, t in sd.items():
        if _IGNORABLE.search(name):
            continue
        t = t.detach().to("cpu", torch.float32)
        if name.endswith("q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            kv = [sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]]
            internal[p + "in_proj.weight"] = torch.cat([t, *(x.to("cpu", torch.float32) for x in kv)])
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            continue
        elif name.endswith("codebook.embed_sum"):
            continue  # gathered per group below
        elif name.endswith("codebook.cluster_usage"):
            continue
        else:
            internal[name] = t
    for group, n in (
        ("semantic", config.num_semantic_quantizers),
        ("acoustic", config.num_quantizers - config.num_semantic_quantizers),
    ):
        p = f"quantizer.{group}_residual_vector_quantizer."
        vecs = []
        for j in range(n):
            embed_sum = sd[f"{p}layers.{j}.codebook.embed_sum"].to("cpu", torch.float32)
            usage = sd[f"{p}layers.{j}.codebook.cluster_usage"].to("cpu", torch.float32)
            vecs.append(embed_sum / usage.clamp(min=CODEBOOK_EPS)[:, None])
        internal[p + "codebooks"] = torch.stack(vecs)

    # Own, 64-byte aligned storage for every tensor: MKL's few-row GEMM kernels (see `_decode_linear`)
    # round differently depending on a weight's address, so weights left at an arbitrary offset
    # inside a safetensors buffer would make outputs depend on the file they came from.
    internal = {
        k: v if v.is_contiguous() and v.data_ptr() % 64 == 0 else v.clone(memory_format=torch.contiguous_format)
        for k, v in internal.items()
    }
    with torch.device("meta"):
        model = Mimi(config)
    model.load_state_dict(internal, strict=True, assign=True)
    for m in model._convtrs:
        if m.conv.groups == 1:
            m.use_gemm_layout_()  # the decoder's transposed convs run as GEMMs: no per-step weight copy
    model.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, None)
    return model.eval()


def random_mimi_state_dict(config: MimiConfig, seed: int) -> dict[str, Tensor]:
    """Random transformers-layout weights with audible, code-dependent output (for tests/benches)."""
    g = torch.Generator().manual_seed(seed)
    convtr_idx = {i for i, k in enumerate(_seanet_layout(config, decoder=True)) if k == "convtr"}
    out: dict[str, Tensor] = {}

    def randn(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    for name, shape in sorted(_hf_shapes(config).items()):
        m = re.match(r"decoder\.layers\.(\d+)\.conv\.weight$", name)
        if name.endswith("codebook.embed_sum"):
            t = randn(*shape, std=1.0)
        elif name.endswith("codebook.cluster_usage"):
            t = torch.rand(*shape, generator=g) * 1.5 + 0.5
        elif name.endswith("codebook.initialized"):
            t = torch.ones(shape)
        elif name == "upsample.conv.weight" or (m and int(m.group(1)) in convtr_idx):
            # transposed conv [C_in, C_out/groups, k]: each output sums (C_in/groups) * k/stride taps
            groups = config.upsample_groups if name.startswith("upsample") else 1
            fan = (shape[0] // groups) * shape[2] / (shape[2] // 2)
            t = randn(*shape, std=1.0 / math.sqrt(fan))
        elif name.endswith("conv.weight") or (name.endswith("proj.weight") and len(shape) == 3):
            gain = 0.5 if ".block.3." in name else 1.0
            t = randn(*shape, std=gain / math.sqrt(shape[1] * shape[2]))
        elif name.endswith("conv.bias"):
            t = randn(*shape, std=0.02)
        elif name.endswith("layernorm.weight"):
            t = 1.0 + randn(*shape, std=0.1)
        elif name.endswith("layernorm.bias"):
            t = randn(*shape, std=0.1)
        elif name.endswith("layer_scale.scale"):
            t = torch.rand(*shape, generator=g) * 0.2 + 0.05
        elif len(shape) == 2:  # linear [out, in]
            t = randn(*shape, std=1.0 / math.sqrt(shape[1]))
        else:
            raise AssertionError(f"no init rule for {name}")
        out[name] = t.float().contiguous()
    return out


def safe_level_(state_dict: dict[str, Tensor], config: MimiConfig, seed: int = 0, peak: float = 0.25) -> dict[str, Tensor]:
    """Make a random transformers-layout Mimi's decoded audio safe to listen to, in place: no DC
    offset and about `peak` (0.25 = -12 dBFS) at most. For test checkpoints, whose audio is noise.

    Random weights decode to noise several times full scale with a DC offset (clipped, it is a
    hearing risk through headphones). The last decoder conv makes the samples, so only it
    changes: each input channel's taps are made to sum to zero and its bias is zeroed (a
    differencing filter, so no input can give a DC offset), then the weights are scaled so that
    decoding random codes peaks at `peak`. The model code is untouched.
    """
    convs = [(int(m.group(1)), k) for k in state_dict if (m := re.match(r"decoder\.layers\.(\d+)\.conv\.weight$", k))]
    weight_name = max(convs)[1]
    bias_name = weight_name[: -len("weight")] + "bias"
    w = state_dict[weight_name]
    state_dict[weight_name] = w - w.mean(dim=-1, keepdim=True)
    state_dict[bias_name] = torch.zeros_like(state_dict[bias_name])
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.codebook_size, (2, config.num_quantizers, 50), generator=g)
    with torch.inference_mode():
        measured = float(mimi_from_state_dict(state_dict, config).decode(codes).abs().max())
    state_dict[weight_name] = (state_dict[weight_name] * (peak / max(measured, 1e-6))).contiguous()
    return state_dict


# --------------------------------------------------------------------------------------------
# loading from disk / the Hub


def _read_safetensors(paths: list[Path], prefix: str = "") -> dict[str, Tensor]:
    from safetensors import safe_open

    out = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


def _load_folder(folder: Path) -> tuple[MimiConfig, dict[str, Tensor]]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Mimi folder, a .safetensors file or a hub repo id")
    d = json.loads(cfg_path.read_text())
    is_csm = d.get("model_type") == "csm" or "codec_config" in d
    config = MimiConfig.from_hf_dict(d)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    else:
        files = [folder / "model.safetensors"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise CheckpointError(f"Mimi weights not found: {', '.join(missing)}")
    # A CSM checkpoint bundles Mimi under `codec_model.`
    return config, _read_safetensors(files, prefix="codec_model." if is_csm else "")


def load_mimi(source: str | Path | None = None, *, device: str | torch.device = "cpu") -> Mimi:
    """Load Mimi weights (fp32, eval mode) from a local path or the Hugging Face Hub.

    `source` may be
      * None: the `kyutai/mimi` hub repo;
      * a local folder with config.json + model.safetensors (kyutai/mimi, or a transformers CSM
        checkpoint, whose `codec_config` / `codec_model.*` are used);
      * a local .safetensors file in either layout (architecture: `MimiConfig.full()`, or a
        config.json next to it);
      * a hub repo id ("kyutai/mimi") or a hub file ("owner/repo/path/file.safetensors", e.g.
        "kyutai/moshiko-pytorch-bf16/tokenizer-e351c8d8-checkpoint125.safetensors").
    Hub access honours HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.
    """
    source = DEFAULT_REPO if source is None else source
    path = Path(source).expanduser()
    if not path.exists():
        s = str(source)
        if os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") < 1:
            raise CheckpointError(f"Mimi checkpoint path {s} does not exist")
        parts = s.split("/")
        if s.endswith(".safetensors") and len(parts) >= 3:
            path = hub_download("/".join(parts[:2]), filename="/".join(parts[2:]))
        else:
            path = hub_download(s, patterns=MIMI_PATTERNS)

    if path.is_dir():
        config, sd = _load_folder(path)
    else:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: only .safetensors Mimi checkpoints are supported")
        side = path.with_name("config.json")
        config = MimiConfig.from_hf_dict(json.loads(side.read_text())) if side.is_file() else MimiConfig.full()
        try:
            sd = _read_safetensors([path])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from e
        if any(k.startswith("codec_model.") for k in sd):
            sd = {k[len("codec_model.") :]: v for k, v in sd.items() if k.startswith("codec_model.")}
    return mimi_from_state_dict(sd, config).to(device)


__all__ = [
    "DEFAULT_REPO",
    "load_mimi",
    "mimi_from_state_dict",
    "random_mimi_state_dict",
    "safe_level_",
    "to_moshi_state_dict",
]
