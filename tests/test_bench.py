"""`csm-plugin bench` at the tiny size: a smoke run (no timing assertions), the service figures
(a new conversation with a shared voice prompt, a styled reply) and the int8 path."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest
import torch

from csm_plugin import bench, bench_agent_turn
from csm_plugin.cli import main
from csm_plugin.engine import Engine, FrameGenerator, Sampling
from csm_plugin.errors import CheckpointError, InputError
from csm_plugin.models.loading import load_checkpoint
from csm_plugin.prompt import build_prompt

from conftest import generate_codes

SERVICE_KEYS = ("warm_conversation_service", "new_conversation_voice", "new_conversation_voice_first", "unstyled_reply",
                "styled_reply")


@pytest.mark.slow  # the bench end to end, with the transformers baseline
def test_bench_tiny_writes_its_json(tmp_path, monkeypatch):
    # Every use of the bench's engine runs on one thread (compiled CUDA-graph trees recorded on one
    # thread fail when replayed on another): the engine figures, the service's and the agent turn's.
    threads = set()
    for cls, name in [(bench.Engine, "_step"), (bench.Engine, "prefill_context_steps"), (FrameGenerator, "warm_up")]:
        original = getattr(cls, name)

        def spy(*args, _original=original, **kwargs):
            threads.add(threading.get_ident())
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "tiny", "--streams", "2", "--frames", "3", "--json", str(out)]) == 0
    assert len(threads) == 1 and threading.get_ident() not in threads
    result = json.loads(out.read_text())
    assert result["settings"]["size"] == "tiny" and result["machine"]["cpus"] >= 1
    assert result["versions"]["torch"] == torch.__version__
    for key in ("backbone_ms", "depth_ms", "codec_ms", "frame_ms", "real_time_factor"):
        assert result["per_frame"][key] > 0
    assert result["time_to_first_audio_ms"]["warm_conversation"] > 0
    assert result["baseline_transformers_generate"]["frame_ms"] > 0 and result["ratios"]["frame_time_speedup"] > 0
    assert set(result["concurrency"]["p95_frame_interval_ms_by_streams"]) <= {"1", "2"}
    # The service figures sit beside the engine's, with the voice prompt's length.
    ttfa = result["time_to_first_audio_ms"]
    assert all(ttfa[key] > 0 for key in SERVICE_KEYS)
    assert result["settings"]["voice_prompt_seconds"] == bench.VOICE_PROMPT_SECONDS
    target = result["targets"]["new_conversation_voice_vs_warm"]
    assert target["target"] == 1.3 and target["met"] == (target["ratio"] <= 1.3)
    assert target["ratio"] == pytest.approx(ttfa["new_conversation_voice"] / ttfa["warm_conversation"])
    assert "agent_turn" not in result  # only with --agent-turn


def test_service_figures_share_the_voice_and_condition_the_style(hf_checkpoint):
    """The new-conversation and style figures come from the paths they name: the second
    conversation with a voice copies its rows (prefix store hits), the first prefilled them; the
    style's exemplars are rows the reply is conditioned on."""
    engine = Engine.load(hf_checkpoint, slots=2)
    context = bench.conversation(4)
    out = asyncio.run(bench.service_first_audio(engine, context, voice_prompt_seconds=1.5, samples=2))
    for key in (*SERVICE_KEYS, "styled_reply_extra_ms"):
        assert math.isfinite(out[key]), key
    assert all(out[key] > 0 for key in SERVICE_KEYS)
    assert out["styled_reply_extra_ms"] == pytest.approx(out["styled_reply"] - out["unstyled_reply"])
    assert out["voice_prefix_hits"] == 2  # one per sample: each second conversation copied the voice rows
    assert len(engine.prefixes) == 2  # each sample's voice was new to the service: prefilled once, stored
    frames = round(1.5 * 12.5)
    assert out["voice_prompt_rows"] > frames  # the prompt's audio frames, an end row and its text
    assert out["style_exemplar_rows"] > sum(round(s * 12.5) for _, _, s in bench.STYLE_EXEMPLARS)
    # The engine is free again for the engine figures: no conversation holds a slot.
    assert not [slot.owner for slot in engine.slots if str(slot.owner).startswith("bench-")]


@pytest.mark.slow  # the bench end to end with a voice agent's turn through both adapters
def test_bench_agent_turn_json(tmp_path):
    pytest.importorskip("pipecat")
    pytest.importorskip("livekit.agents")
    out = tmp_path / "bench.json"
    assert main([
        "bench", "--streams", "2", "--frames", "3", "--no-baseline", "--threads", "1", "--json", str(out), "--agent-turn",
        "--agent-turns", "2", "--voice-prompt-seconds", "3", "--llm-first-token-ms", "150",
    ]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["voice_prompt_seconds"] == 3.0 and result["machine"]["torch_threads"] == 1
    assert all(result["time_to_first_audio_ms"][key] > 0 for key in SERVICE_KEYS)
    turn = result["agent_turn"]
    assert turn["settings"]["turns"] == 2 and turn["settings"]["llm_first_token_ms"] == 150.0
    assert turn["llm_first_clause_ms"] > 0 and turn["frame_step_ms"] > 0
    for name in ("pipecat", "livekit"):
        section = turn[name]
        assert section["first_audio_ms"] > 0 and len(section["first_audio_ms_by_turn"]) == 2
        assert section["llm_first_token_to_first_audio_ms"] > 0
        assert section["history"]["user_texts"] == [line for line, _, _ in bench_agent_turn.SCRIPT[:2]]
        assert section["history"]["user_turns_with_audio"] == 2
        assert result["targets"]["llm_first_token_to_first_audio"][name]["split_mode"] == section["split"]["mode_observed"]
    rows = dict(bench_agent_turn.table_rows(result))
    assert "first audio, new conversation + voice" in rows and "agent turn: LLM first clause" in rows
    assert any(k.startswith("agent turn, livekit") for k in rows) and any(k.startswith("agent turn, pipecat") for k in rows)


@pytest.mark.slow  # loads the checkpoint twice and quantizes it
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
