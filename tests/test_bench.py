"""`csm-plugin bench` at the tiny size: a smoke run (no timing assertions) and the int8 path."""

from __future__ import annotations

import json

import pytest
import torch

from csm_plugin.cli import main
from csm_plugin.engine import Engine, Sampling
from csm_plugin.errors import CheckpointError, InputError
from csm_plugin.models.loading import load_checkpoint
from csm_plugin.prompt import build_prompt

from conftest import generate_codes

pytestmark = pytest.mark.slow  # the bench end to end (with the transformers baseline) and the int8 variant


def test_bench_tiny_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--streams", "2", "--frames", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["size"] == "tiny" and result["machine"]["cpus"] >= 1
    assert result["versions"]["torch"] == torch.__version__
    for key in ("backbone_ms", "depth_ms", "codec_ms", "frame_ms", "real_time_factor"):
        assert result["per_frame"][key] > 0
    assert result["time_to_first_audio_ms"]["warm_conversation"] > 0
    assert result["baseline_transformers_generate"]["frame_ms"] > 0 and result["ratios"]["frame_time_speedup"] > 0
    assert set(result["concurrency"]["p95_frame_interval_ms_by_streams"]) <= {"1", "2"}


def test_int8_model_is_close_to_fp32(hf_checkpoint):
    fp32 = load_checkpoint(hf_checkpoint)
    int8 = load_checkpoint(hf_checkpoint, quantize="int8")
    assert type(int8.model.backbone.layers[0].attn.wq).__module__.startswith("torch.ao.nn.quantized")
    tokens, mask = build_prompt(fp32.tokenizer, [], 0, "Hello there, how are you today?")
    logits = []
    for loaded in (fp32, int8):
        loaded.model.setup_caches(1)
        with torch.inference_mode():
            x = loaded.model.embed_rows(tokens[None], mask[None])
            h = loaded.model.backbone_forward(x, torch.arange(len(tokens))[None], torch.tensor([0]))
            logits.append(loaded.model.codebook0_logits(h)[0])
    assert logits[0].shape == logits[1].shape
    assert float((logits[1] - logits[0]).abs().max() / logits[0].abs().max()) < 0.1
    frames = generate_codes(int8, [], 0, "Hi.", Sampling(max_audio_ms=400))
    assert len(frames) == 5 and all(f.shape == (32,) for f in frames)
    with pytest.raises(CheckpointError, match="int8"):
        load_checkpoint(hf_checkpoint, dtype=torch.bfloat16, quantize="int8")
    with pytest.raises(InputError, match="compile"):
        Engine(int8, compile=True)
