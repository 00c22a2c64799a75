"""Mimi codec: equivalence with transformers' MimiModel, streaming decode, both weight layouts, audio helpers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from csm_plugin.audio import float_to_int16, int16_to_float, read_mono, resample_to_24k
from csm_plugin.errors import AudioError, CheckpointError
from csm_plugin.models.mimi import FRAME_SIZE, MimiConfig
from csm_plugin.models.mimi_loading import (
    load_mimi,
    mimi_from_state_dict,
    random_mimi_state_dict,
    to_moshi_state_dict,
)

transformers = pytest.importorskip("transformers")

# A window of 16 latent steps (8 frames) so short tests still exercise the sliding window.
CFG = dataclasses.replace(MimiConfig.tiny(), sliding_window=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mimi-hf")
    save_file(random_mimi_state_dict(CFG, seed=0), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    return d


@pytest.fixture(scope="module")
def hf_state_dict(hf_dir):
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def ref(hf_dir):
    model, info = transformers.MimiModel.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.fixture(scope="module")
def mimi(hf_state_dict):
    return mimi_from_state_dict(hf_state_dict, CFG)


def _codes(batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.codebook_size, (batch, CFG.num_quantizers, frames), generator=g)


def _wav(batch: int, samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 24000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t)
    return tone + 0.1 * torch.randn(batch, 1, samples, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_same_audio(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float32 rounding: within 3e-6 of the peak (3.5e-5 here, where |audio| reaches ~12).

    A stream decoded in a batch of another size takes other GEMM kernels, which round differently;
    through this random network that reaches ~1.2e-5 absolute (~1e-6 of the peak) for the
    reference implementation as much as for the optimised one, while real differences (another
    code, a lost frame of history) are > 1e-3.
    """
    assert a.shape == b.shape
    err, tol = (a - b).abs().max().item(), 3e-6 * b.abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol:.3g}"


# --- config and key layout --------------------------------------------------------------------


def test_random_state_dict_has_transformers_file_layout():
    # transformers >= 5 renames modules in memory but writes the hub names; compare with its file.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        transformers.MimiModel(transformers.MimiConfig(**CFG.to_hf_dict())).save_pretrained(d)
        with safe_open(f"{d}/model.safetensors", framework="pt") as f:
            written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k: tuple(v.shape) for k, v in random_mimi_state_dict(CFG, seed=1).items()}
    assert ours == written


def test_config_round_trip_and_spellings():
    for cfg in (MimiConfig.full(), MimiConfig.tiny(), CFG):
        hf = transformers.MimiConfig(**cfg.to_hf_dict())
        assert hf.frame_size == FRAME_SIZE == cfg.frame_size
        assert hf.frame_rate == cfg.frame_rate == 12.5
        assert MimiConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
        assert MimiConfig.from_hf_dict(hf.to_dict()) == cfg
    full = MimiConfig.full()
    assert (full.num_quantizers, full.codebook_size, full.hidden_size, full.num_hidden_layers) == (32, 2048, 512, 8)
    tiny = MimiConfig.tiny()
    assert (tiny.num_quantizers, tiny.codebook_size, tiny.frame_size) == (32, 2048, 1920)
    # older config.json spellings, extra keys, and the CSM wrapper
    old = {k: v for k, v in CFG.to_hf_dict().items() if k != "rope_parameters"}
    old.update(rope_theta=5000.0, frame_rate=12.5, some_future_key=1)
    assert MimiConfig.from_hf_dict(old).rope_theta == 5000.0
    assert MimiConfig.from_hf_dict({"model_type": "csm", "codec_config": CFG.to_hf_dict()}) == CFG
    with pytest.raises(CheckpointError, match="use_causal_conv"):
        MimiConfig.from_hf_dict({**CFG.to_hf_dict(), "use_causal_conv": False})


# --- equivalence with transformers --------------------------------------------------------------


@pytest.mark.parametrize("samples", [FRAME_SIZE * 12, FRAME_SIZE * 9 + 777])
def test_encode_matches_transformers(mimi, ref, samples):
    wav = _wav(2, samples, seed=samples)
    codes = mimi.encode(wav)
    with torch.no_grad():
        expected = ref.encode(wav).audio_codes
    assert codes.shape == (2, 32, -(-samples // FRAME_SIZE))
    assert codes.dtype == torch.long
    assert torch.equal(codes, expected)


def test_decode_matches_transformers(mimi, ref):
    codes = _codes(2, 12, seed=3)
    audio = mimi.decode(codes)
    with torch.no_grad():
        expected = ref.decode(codes).audio_values
    assert audio.shape == expected.shape == (2, 1, 12 * FRAME_SIZE)
    assert _rel(audio, expected) < 1e-4
    assert 1e-3 < expected.std() < 10  # the random weights make real, bounded signals


def test_outputs_depend_on_inputs(mimi):
    codes = _codes(1, 10, seed=4)
    changed = codes.clone()
    changed[0, 5, 6] = (changed[0, 5, 6] + 1) % CFG.codebook_size
    a, b = mimi.decode(codes), mimi.decode(changed)
    cut = 6 * FRAME_SIZE
    assert torch.equal(a[..., :cut], b[..., :cut])  # causal: earlier frames untouched
    assert (a[..., cut:] - b[..., cut:]).abs().max() > 1e-3

    wav = _wav(1, FRAME_SIZE * 8, seed=5)
    louder = wav.clone()
    louder[..., -FRAME_SIZE:] *= 1.5
    c1, c2 = mimi.encode(wav), mimi.encode(louder)
    assert torch.equal(c1[..., :7], c2[..., :7])
    assert not torch.equal(c1[..., 7], c2[..., 7])


def test_out_of_range_codes_are_clamped(mimi):
    codes = _codes(1, 4, seed=6)
    special = codes.clone()
    special[0, :, 2] = torch.tensor([2048, 2049, 2050, 5000] * 8)
    clamped = codes.clone()
    clamped[0, :, 2] = CFG.codebook_size - 1
    assert torch.equal(mimi.decode(special), mimi.decode(clamped))


def test_fewer_codebooks_matches_transformers(mimi, ref):
    codes = _codes(1, 5, seed=7)[:, :8]
    with torch.no_grad():
        expected = ref.decode(codes).audio_values
    assert _rel(mimi.decode(codes), expected) < 1e-4


@pytest.mark.slow
def test_full_size_matches_transformers(tmp_path):
    cfg = MimiConfig.full()
    sd = random_mimi_state_dict(cfg, seed=2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    ref_full = transformers.MimiModel.from_pretrained(str(tmp_path)).eval()
    ours = mimi_from_state_dict(sd, cfg)
    wav = _wav(1, FRAME_SIZE * 8 + 5, seed=14)
    codes = ours.encode(wav)
    with torch.no_grad():
        assert torch.equal(codes, ref_full.encode(wav).audio_codes)
        expected = ref_full.decode(codes).audio_values
    assert _rel(ours.decode(codes), expected) < 1e-4


def test_grouped_kv_heads_match_transformers(tmp_path):
    # 4 query heads sharing 2 kv heads: the streaming attention stacks each group's queries.
    cfg = dataclasses.replace(CFG, num_key_value_heads=2)
    sd = random_mimi_state_dict(cfg, seed=3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    ref_gqa = transformers.MimiModel.from_pretrained(str(tmp_path)).eval()
    ours = mimi_from_state_dict(sd, cfg)
    wav = _wav(1, FRAME_SIZE * 6, seed=15)
    codes = ours.encode(wav)
    with torch.no_grad():
        assert torch.equal(codes, ref_gqa.encode(wav).audio_codes)
        expected = ref_gqa.decode(codes).audio_values
    assert _rel(ours.decode(codes), expected) < 1e-4
    state = ours.decode_state(1)
    streamed = torch.cat([ours.decode_step(codes[..., i : i + 1], state) for i in range(codes.shape[-1])], dim=-1)
    assert _rel(streamed, expected) < 1e-4


# --- streaming decode ----------------------------------------------------------------------------


def test_streaming_one_frame_at_a_time_equals_whole_decode(mimi):
    codes = _codes(1, 34, seed=8)  # 68 latent steps: several trips around the 16-slot ring
    whole = mimi.decode(codes)
    state = mimi.decode_state(1)
    parts = []
    for i in range(codes.shape[-1]):
        out = mimi.decode_step(codes[..., i : i + 1], state)
        assert out.shape == (1, 1, FRAME_SIZE)
        parts.append(out)
    assert (torch.cat(parts, dim=-1) - whole).abs().max() < 1e-5


def test_streaming_uneven_chunks_and_reset(mimi):
    codes = _codes(1, 31, seed=9)
    whole = mimi.decode(codes)
    state = mimi.decode_state(1)
    parts, start = [], 0
    for size in (3, 1, 7, 2, 11, 1, 6):
        parts.append(mimi.decode_step(codes[..., start : start + size], state))
        start += size
    assert start == codes.shape[-1]
    assert (torch.cat(parts, dim=-1) - whole).abs().max() < 1e-5
    # after a reset the same state decodes a new utterance from scratch
    state.reset_()
    again = mimi.decode_step(codes[..., :5], state)
    assert (again - whole[..., : 5 * FRAME_SIZE]).abs().max() < 1e-5


def test_batched_streams_are_independent(mimi):
    a, b = _codes(1, 20, seed=10), _codes(1, 20, seed=11)
    alone_a, alone_b = mimi.decode(a), mimi.decode(b)
    state = mimi.decode_state(2)
    # stream 1 starts 3 frames late (different positions per stream) and is reset mid-way
    out_a, out_b = [], []
    for i in range(20):
        step_b = b[..., i - 3 : i - 2] if i >= 3 else a[..., :1]
        out = mimi.decode_step(torch.cat([a[..., i : i + 1], step_b]), state)
        if i == 2:
            state.reset_(torch.tensor([False, True]))
        out_a.append(out[:1])
        if i >= 3:
            out_b.append(out[1:])
    _assert_same_audio(torch.cat(out_a, dim=-1), alone_a)
    _assert_same_audio(torch.cat(out_b, dim=-1), alone_b[..., : 17 * FRAME_SIZE])


# --- a pooled state: decode_step(codes [n, K, F], state, rows=[n]) -------------------------------


def _stream_alone(mimi, codes: torch.Tensor) -> torch.Tensor:
    """One stream decoded by itself, frame by frame, with its own 1-row state: [1, K, F] -> [1, 1, F * 1920]."""
    state = mimi.decode_state(1)
    return torch.cat([mimi.decode_step(codes[..., i : i + 1], state) for i in range(codes.shape[-1])], dim=-1)


def _state_rows(state, rows: list[int]) -> list[torch.Tensor]:
    """Copies of every state tensor restricted to `rows` (to check they are left untouched)."""
    idx = torch.tensor(rows, dtype=torch.long)
    tensors = [*state.conv_tails, *state.convtr_tails, state.kv_pos, state.pos]
    return [t[idx].clone() for t in tensors] + [state.k_cache[:, idx].clone(), state.v_cache[:, idx].clone()]


def _pool_scenario(mimi, codes: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """Decode 4 streams through one 6-row pool, one decode_step per frame, and return each stream's audio.

    Streams get rows out of order (4, 1, 5, 0; rows 2 and 3 stay free), join at frames 0, 2, 3 and 6,
    have different lengths, are passed in a different order every frame, and stream 1 pauses for
    frames 5-6 (its row is idle while the others advance). Every call must leave the rows it does
    not name bit-for-bit untouched.
    """
    rows, starts, paused = [4, 1, 5, 0], [0, 2, 3, 6], {1: {5, 6}}
    pool = mimi.decode_state(6)
    out: list[list[torch.Tensor]] = [[] for _ in codes]
    done = [0] * len(codes)  # frames decoded so far, per stream
    g = torch.Generator().manual_seed(0)
    calls = 0
    for frame in range(40):
        live = [i for i in range(len(codes)) if starts[i] <= frame and done[i] < codes[i].shape[-1]]
        live = [i for i in live if frame not in paused.get(i, ())]
        if not live:
            continue
        live = [live[j] for j in torch.randperm(len(live), generator=g).tolist()]
        idle = [r for r in range(6) if r not in [rows[i] for i in live]]
        before = _state_rows(pool, idle)
        batch = torch.cat([codes[i][..., done[i] : done[i] + 1] for i in live])  # [n, K, 1]
        audio = mimi.decode_step(batch, pool, rows=torch.tensor([rows[i] for i in live]))
        assert audio.shape == (len(live), 1, FRAME_SIZE)
        assert all(torch.equal(a, b) for a, b in zip(before, _state_rows(pool, idle)))
        for j, i in enumerate(live):
            out[i].append(audio[j : j + 1])
            done[i] += 1
        calls += 1
    assert done == [c.shape[-1] for c in codes]
    return [torch.cat(o, dim=-1) for o in out], calls


def test_pool_rows_decode_each_stream_as_if_alone(mimi):
    codes = [_codes(1, n, seed=20 + i) for i, n in enumerate([14, 9, 12, 5])]
    got, calls = _pool_scenario(mimi, codes)
    assert calls == 15  # frames 0-14 carry 40 stream-frames: several streams per call
    for audio, c in zip(got, codes):
        _assert_same_audio(audio, _stream_alone(mimi, c))


def test_pool_rows_one_streams_codes_change_only_that_stream(mimi):
    codes = [_codes(1, n, seed=20 + i) for i, n in enumerate([14, 9, 12, 5])]
    changed = [c.clone() for c in codes]
    changed[2][0, 3, 4] = (changed[2][0, 3, 4] + 1) % CFG.codebook_size  # stream 2, its 5th frame
    a, _ = _pool_scenario(mimi, codes)
    b, _ = _pool_scenario(mimi, changed)
    for i in (0, 1, 3):
        assert torch.equal(a[i], b[i])  # same calls, same rows: other streams bit-identical
    cut = 4 * FRAME_SIZE
    assert torch.equal(a[2][..., :cut], b[2][..., :cut])
    assert (a[2][..., cut:] - b[2][..., cut:]).abs().max() > 1e-3


def test_pool_rows_multi_frame_chunks_and_full_pool_in_order(mimi):
    codes = _codes(3, 10, seed=30)
    alone = [_stream_alone(mimi, codes[i : i + 1]) for i in range(3)]
    pool = mimi.decode_state(3)
    parts = [mimi.decode_step(codes[[2, 0], :, :4], pool, rows=[2, 0])]  # a 4-frame chunk, 2 of 3 rows
    parts.append(mimi.decode_step(codes[[1], :, :4], pool, rows=[1]))
    parts.append(mimi.decode_step(codes[..., 4:], pool, rows=torch.arange(3)))  # all rows, in order
    out = [torch.cat([parts[0][1:2], parts[2][0:1]], dim=-1), torch.cat([parts[1], parts[2][1:2]], dim=-1)]
    out.append(torch.cat([parts[0][0:1], parts[2][2:3]], dim=-1))
    for o, a in zip(out, alone):
        _assert_same_audio(o, a)
    # rows naming every row in order is the same computation as rows=None
    p1, p2 = mimi.decode_state(3), mimi.decode_state(3)
    assert torch.equal(mimi.decode_step(codes, p1, rows=[0, 1, 2]), mimi.decode_step(codes, p2))


@pytest.mark.parametrize("how", ["rows", "mask"])
def test_pool_reset_row_behaves_like_fresh_state(mimi, how):
    first, second, other = _codes(1, 9, seed=40), _codes(1, 6, seed=41), _codes(1, 15, seed=42)
    pool = mimi.decode_state(3)
    out_other = []
    for i in range(9):  # row 2 runs `first`, row 0 runs `other`
        out = mimi.decode_step(torch.cat([first[..., i : i + 1], other[..., i : i + 1]]), pool, rows=[2, 0])
        out_other.append(out[1:])
    before = _state_rows(pool, [0, 1])
    if how == "rows":
        pool.reset_(rows=[2])
    else:
        pool.reset_(torch.tensor([False, False, True]))
    assert all(torch.equal(a, b) for a, b in zip(before, _state_rows(pool, [0, 1])))
    fresh = mimi.decode_state(1)
    assert all(torch.equal(a, b) for a, b in zip(_state_rows(pool, [2]), _state_rows(fresh, [0])))
    out_second = []
    for i in range(6):  # row 2 now belongs to a new stream; row 0 carries on
        out = mimi.decode_step(torch.cat([other[..., 9 + i : 10 + i], second[..., i : i + 1]]), pool, rows=[0, 2])
        out_other.append(out[:1])
        out_second.append(out[1:])
    _assert_same_audio(torch.cat(out_second, dim=-1), _stream_alone(mimi, second))
    _assert_same_audio(torch.cat(out_other, dim=-1), _stream_alone(mimi, other))


def test_pool_bad_rows_raise(mimi):
    pool = mimi.decode_state(4)
    codes = _codes(2, 1, seed=50)
    snapshot = _state_rows(pool, [0, 1, 2, 3])
    cases = [
        ([0, 4], "out of range"),
        ([-1, 0], "out of range"),
        ([1, 1], "more than once"),
        ([0], "2 streams"),
        ([0, 1, 2], "2 streams"),
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([[0, 1]]), "1-D"),
    ]
    for rows, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mimi.decode_step(codes, pool, rows=rows)
    with pytest.raises(ValueError, match="B=4"):
        mimi.decode_step(codes, pool)  # rows=None needs one code row per state row
    with pytest.raises(ValueError, match="more than once"):
        pool.reset_(rows=[3, 3])
    with pytest.raises(ValueError, match="out of range"):
        pool.reset_(rows=[7])
    with pytest.raises(ValueError, match="not both"):
        pool.reset_(torch.ones(4, dtype=torch.bool), rows=[0])
    assert all(torch.equal(a, b) for a, b in zip(snapshot, _state_rows(pool, [0, 1, 2, 3])))
    assert mimi.decode_step(codes[:0], pool, rows=[]).shape == (0, 1, FRAME_SIZE)


# --- weight layouts and strict loading ----------------------------------------------------------


def test_moshi_layout_loads_to_identical_outputs(mimi, hf_state_dict):
    moshi_sd = to_moshi_state_dict(hf_state_dict, CFG)
    assert "encoder.model.0.conv.conv.weight" in moshi_sd
    assert "decoder.model.2.convtr.convtr.weight" in moshi_sd
    assert "upsample.convtr.convtr.convtr.weight" in moshi_sd
    assert "downsample.conv.conv.conv.weight" in moshi_sd
    assert "decoder_transformer.transformer.layers.0.self_attn.in_proj_weight" in moshi_sd
    assert "quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum" in moshi_sd
    assert not any("q_proj" in k or "layers.0.conv.weight" == k for k in moshi_sd)
    other = mimi_from_state_dict(moshi_sd, CFG)
    mine, theirs = mimi.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    codes = _codes(1, 3, seed=12)
    assert torch.equal(mimi.decode(codes), other.decode(codes))


@pytest.mark.parametrize("layout", ["transformers", "moshi"])
def test_strict_loading_names_offending_tensors(hf_state_dict, layout):
    sd = dict(hf_state_dict if layout == "transformers" else to_moshi_state_dict(hf_state_dict, CFG))
    key = sorted(k for k in sd if "decoder_transformer" in k and "weight" in k)[0]

    missing = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing: .*{key}"):
        mimi_from_state_dict(missing, CFG)

    extra = {**sd, "decoder.extra_thing.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="unexpected: decoder.extra_thing.weight"):
        mimi_from_state_dict(extra, CFG)

    bad = {**sd, key: torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match=f"misshaped: {key}"):
        mimi_from_state_dict(bad, CFG)

    # `initialized` flags are optional
    mimi_from_state_dict({k: v for k, v in sd.items() if "initialized" not in k}, CFG)


def test_load_mimi_from_folder_and_moshi_file(tmp_path, hf_dir, hf_state_dict, mimi):
    codes = _codes(1, 2, seed=13)
    expected = mimi.decode(codes)
    assert torch.equal(load_mimi(hf_dir).decode(codes), expected)

    # A transformers CSM checkpoint bundles Mimi as `codec_model.*` with the config in codec_config.
    csm = tmp_path / "csm"
    csm.mkdir()
    save_file({f"codec_model.{k}": v for k, v in hf_state_dict.items()}, str(csm / "model.safetensors"))
    (csm / "config.json").write_text(json.dumps({"model_type": "csm", "codec_config": CFG.to_hf_dict()}))
    assert torch.equal(load_mimi(csm).decode(codes), expected)

    moshi = tmp_path / "moshi"
    moshi.mkdir()
    save_file(to_moshi_state_dict(hf_state_dict, CFG), str(moshi / "tokenizer.safetensors"))
    (moshi / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    assert torch.equal(load_mimi(moshi / "tokenizer.safetensors").decode(codes), expected)


def test_load_mimi_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mimi(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_mimi(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        load_mimi("someone/not-a-mimi-repo")


# --- audio helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [16000, 44100, 24000])
def test_resample_to_24k_length(rate):
    n = rate * 2 + 123
    wav = np.sin(np.arange(n) * 2 * np.pi * 300 / rate).astype(np.float32)
    out = resample_to_24k(wav, rate)
    assert out.dtype == np.float32
    assert abs(len(out) - n * 24000 / rate) <= 1


def test_audio_errors_and_pcm(tmp_path):
    with pytest.raises(AudioError, match="mono"):
        resample_to_24k(np.zeros((2, 1000), np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        resample_to_24k(np.zeros(0, np.float32), 16000)
    import soundfile as sf

    sf.write(str(tmp_path / "st.wav"), np.zeros((100, 2), np.float32), 16000)
    with pytest.raises(AudioError, match="2 channels"):
        read_mono(tmp_path / "st.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match="empty"):
        read_mono(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(AudioError, match="cannot read"):
        read_mono(tmp_path / "junk.wav")
    sf.write(str(tmp_path / "ok.wav"), np.full(50, 0.25, np.float32), 16000)
    wav, sr = read_mono(tmp_path / "ok.wav")
    assert sr == 16000 and wav.shape == (50,)
    pcm = float_to_int16(np.array([-2.0, -1.0, 0.0, 0.5, 1.0], np.float32))
    assert pcm.tolist() == [-32767, -32767, 0, 16384, 32767]
    assert np.allclose(int16_to_float(pcm), [-1, -1, 0, 0.5, 1], atol=1e-4)
