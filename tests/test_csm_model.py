"""The CSM language model against transformers' CsmForConditionalGeneration on the same weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from csm_plugin.engine import Sampling
from csm_plugin.errors import CheckpointError, InputError
from csm_plugin.models.loading import (
    bundled_tokenizer_file,
    from_internal,
    hf_config,
    load_checkpoint,
    read_tensors,
    sesame_config,
    tiny_config,
    to_internal,
)
from csm_plugin.models.mimi import MimiConfig
from csm_plugin.prompt import Segment, build_prompt

from conftest import generate_codes, randomize_


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A transformers CSM with random weights, saved by transformers itself."""
    torch.manual_seed(0)
    config = transformers.CsmConfig(**hf_config(tiny_config(), MimiConfig.tiny().to_hf_dict()))
    model = transformers.CsmForConditionalGeneration(config).eval()
    randomize_(model, seed=1)
    model.depth_decoder.model.embed_tokens.weight.data.copy_(
        model.backbone_model.embed_tokens.embed_audio_tokens.weight.data
    )
    path = tmp_path_factory.mktemp("transformers-csm")
    model.save_pretrained(path)
    shutil.copyfile(bundled_tokenizer_file(), path / "tokenizer.json")
    return model, path


@pytest.fixture(scope="module")
def ours(reference):
    return load_checkpoint(reference[1])


def conversation(codes_seed: int = 0) -> tuple[list[Segment], int, str]:
    g = torch.Generator().manual_seed(codes_seed)
    context = [
        Segment(0, "Hello from Sesame.", torch.randint(0, 2048, (6, 32), generator=g)),
        Segment(1, "Hi! How are you doing today?", torch.randint(0, 2048, (4, 32), generator=g)),
    ]
    return context, 0, "I am fine, thanks for asking."


def reference_embeddings(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows embedded by transformers' own modules: text rows by embed_text_tokens, audio rows
    (frames and the end-of-audio frame) by the backbone's summed codebook embeddings."""
    is_text = mask[:, -1]
    with torch.no_grad():
        text = model.embed_text_tokens(tokens[:, -1])
        audio = model.backbone_model.embed_tokens(tokens[None, :, :-1])[0]
    return torch.where(is_text[:, None], text, audio)[None]


def backbone_logits(loaded, tokens, mask):
    loaded.model.setup_caches(1)
    with torch.inference_mode():
        x = loaded.model.embed_rows(tokens[None], mask[None])
        h = loaded.model.backbone_forward(x, torch.arange(tokens.shape[0])[None], torch.tensor([0]))
        return loaded.model.codebook0_logits(h)[0], h[0, -1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_prompt_layout(ours):
    context, speaker, text = conversation()
    tokens, mask = build_prompt(ours.tokenizer, context, speaker, text)
    tok = ours.tokenizer.tokenizer
    first_text = tok.encode("[0]Hello from Sesame.", add_special_tokens=False).ids
    n = len(first_text) + 2
    assert tokens[:n, -1].tolist() == [128000, *first_text, 128001]
    assert mask[:n].sum(1).tolist() == [1] * n and mask[:n, -1].all()
    # 6 audio frames, then the all-zero end-of-audio frame, all 32 codebook columns active
    assert np.array_equal(tokens[n : n + 6, :32].numpy(), context[0].codes)
    assert not tokens[n + 6].any() and mask[n : n + 7, :32].all() and not mask[n : n + 7, -1].any()
    assert tok.decode(tokens[-len(tok.encode("[0]" + text, add_special_tokens=False).ids) - 1 : -1, -1].tolist()) == "[0]" + text


def test_backbone_logits_match_transformers(reference, ours):
    model, _ = reference
    tokens, mask = build_prompt(ours.tokenizer, *conversation())
    with torch.no_grad():
        expected = model(inputs_embeds=reference_embeddings(model, tokens, mask)).logits[0]
    logits, _ = backbone_logits(ours, tokens, mask)
    assert logits.shape == expected.shape == (tokens.shape[0], 2051)
    assert rel_err(logits, expected) < 1e-4
    # The audio context matters: other codes give other logits (random weights hide nothing here).
    other_tokens, _ = build_prompt(ours.tokenizer, *conversation(codes_seed=1))
    other, _ = backbone_logits(ours, other_tokens, mask)
    assert rel_err(other[-1], logits[-1]) > 1e-2


def test_depth_decoder_logits_match_transformers(reference, ours):
    model, _ = reference
    tokens, mask = build_prompt(ours.tokenizer, *conversation())
    _, h = backbone_logits(ours, tokens, mask)
    codes = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids = torch.nn.functional.pad(codes[:, :31], (1, 0))  # position 0: placeholder for h
        expected = model.depth_decoder(input_ids=ids, backbone_last_hidden_state=h[None]).logits[0]  # codebooks 1..31
    m = ours.model
    got = []
    with torch.inference_mode():
        d = m.decoder_forward(torch.stack([h, m.embed_code(codes[:, 0], 0)[0, 0]])[None], start=0)[:, -1]
        for i in range(1, 32):
            got.append(m.depth_logits(d, i)[0])
            if i < 31:
                d = m.decoder_forward(m.embed_code(codes[:, i], i), start=i + 1)[:, -1]
    assert rel_err(torch.stack(got), expected) < 1e-4


def test_greedy_generation_matches_transformers(reference, ours):
    model, _ = reference
    context, speaker, text = conversation()
    tokens, mask = build_prompt(ours.tokenizer, context, speaker, text)
    frames = generate_codes(ours, context, speaker, text, Sampling(top_k=1, max_audio_ms=960))
    assert len(frames) == 12
    with torch.no_grad():
        expected = model.generate(
            inputs_embeds=reference_embeddings(model, tokens, mask),
            do_sample=False,
            depth_decoder_do_sample=False,
            max_new_tokens=12,
        )[0]
    assert torch.equal(torch.stack(frames), expected[-12:])
    assert len({tuple(f.tolist()) for f in frames}) > 1  # not one frame repeated


def write_sesame(src, dst, state_transform=lambda s: s, as_ckpt=False):
    fmt_state = read_tensors(src)
    cfg = load_checkpoint(src).config
    state = {k: v for k, v in fmt_state.items() if not k.startswith("codec_model.")}
    sesame = from_internal(to_internal(state, "hf", cfg), "sesame", cfg)
    sesame = state_transform(sesame)
    dst.mkdir()
    config = sesame_config(cfg)
    # carry the codec over as a moshi-format file, as Sesame's users get it from kyutai's repo
    from csm_plugin.models.mimi_loading import to_moshi_state_dict

    codec = {k[len("codec_model."):]: v for k, v in fmt_state.items() if k.startswith("codec_model.")}
    raw = json.loads((src / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_moshi_state_dict(codec, MimiConfig.from_hf_dict(raw["codec_config"])).items()}, dst / "mimi.safetensors")
    config.update(mimi="mimi.safetensors", mimi_config=raw["codec_config"])
    (dst / "config.json").write_text(json.dumps(config))
    if as_ckpt:
        torch.save({"model": sesame}, dst / "ckpt.pt")
    else:
        save_file({k: v.contiguous() for k, v in sesame.items()}, dst / "model.safetensors")
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("as_ckpt", [False, True], ids=["safetensors", "ckpt.pt"])
def test_sesame_format_gives_the_same_outputs(reference, ours, tmp_path, as_ckpt):
    path = write_sesame(reference[1], tmp_path / "sesame", as_ckpt=as_ckpt)
    theirs = load_checkpoint(path)
    assert theirs.format == "sesame"
    # q/k rows really are stored permuted in this format
    raw = read_tensors(path)
    assert not torch.equal(raw["backbone.layers.0.attn.q_proj.weight"], ours.model.backbone.layers[0].attn.wq.weight)
    context, speaker, text = conversation()
    tokens, mask = build_prompt(ours.tokenizer, context, speaker, text)
    a, _ = backbone_logits(ours, tokens, mask)
    b, _ = backbone_logits(theirs, tokens, mask)
    assert rel_err(b, a) < 1e-5
    sampling = Sampling(top_k=1, max_audio_ms=800)
    fa = generate_codes(ours, context, speaker, text, sampling)
    fb = generate_codes(theirs, context, speaker, text, sampling)
    assert torch.equal(torch.stack(fa), torch.stack(fb))


def test_own_test_checkpoint_loads_in_transformers(hf_checkpoint):
    loaded = load_checkpoint(hf_checkpoint)
    model = transformers.CsmForConditionalGeneration.from_pretrained(hf_checkpoint).eval()
    tokens, mask = build_prompt(loaded.tokenizer, *conversation())
    with torch.no_grad():
        expected = model(inputs_embeds=reference_embeddings(model, tokens, mask)).logits[0]
    logits, _ = backbone_logits(loaded, tokens, mask)
    assert rel_err(logits, expected) < 1e-4


def test_sesame_test_checkpoint_loads(sesame_checkpoint, hf_checkpoint):
    # same seed, two formats: the same model
    a, b = load_checkpoint(hf_checkpoint), load_checkpoint(sesame_checkpoint)
    tokens, mask = build_prompt(a.tokenizer, *conversation())
    assert rel_err(backbone_logits(b, tokens, mask)[0], backbone_logits(a, tokens, mask)[0]) < 1e-5


@pytest.mark.slow
def test_bf16_is_close_to_fp32(hf_checkpoint):
    fp32 = load_checkpoint(hf_checkpoint)
    bf16 = load_checkpoint(hf_checkpoint, dtype=torch.bfloat16)
    assert bf16.model.codebook0_head.weight.dtype == torch.bfloat16
    assert next(bf16.codec.parameters()).dtype == torch.float32  # Mimi stays fp32
    tokens, mask = build_prompt(fp32.tokenizer, *conversation())
    a, _ = backbone_logits(fp32, tokens, mask)
    b, _ = backbone_logits(bf16, tokens, mask)
    assert rel_err(b.float(), a) < 0.1
    frames = generate_codes(bf16, conversation()[0], 0, "Hi.", Sampling(seed=1))
    assert frames and all(f.shape == (32,) and 0 <= int(f.min()) and int(f.max()) < 2051 for f in frames)


# --- bad input ------------------------------------------------------------------------------


def test_unknown_path_and_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="neither a transformers CSM config"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_mismatched_checkpoint_names_the_tensors(reference, tmp_path):
    def break_it(state):
        state = dict(state)
        del state["backbone.layers.1.mlp.w2.weight"]
        state["backbone.layers.0.attn.extra.weight"] = torch.zeros(2)
        state["projection.weight"] = torch.zeros(3, 3)
        return state

    path = write_sesame(reference[1], tmp_path / "broken", state_transform=break_it)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "missing tensors for: backbone.layers.1.mlp.w2.weight" in message
    assert "unexpected tensors: backbone.layers.0.attn.extra.weight" in message
    assert "misshaped tensors: projection.weight [3, 3]" in message


def test_bad_text_and_speaker(ours):
    for text in ["", "   ", None]:
        with pytest.raises(InputError, match="text"):
            build_prompt(ours.tokenizer, [], 0, text)
    for speaker in ["0", 1.0, True, -1]:
        with pytest.raises(InputError, match="speaker"):
            build_prompt(ours.tokenizer, [], speaker, "Hello.")
    with pytest.raises(InputError, match="codes"):
        Segment(0, "Hi.", torch.zeros(3, 8, dtype=torch.long))
