"""`csm-plugin bench --agent-turn` (csm_plugin.bench_agent_turn) on the small random checkpoint: the
agent turns run through the real adapters in their frameworks (the conversation the adapter kept
holds the user's turns with their audio and the agent's replies), and the JSON is complete and
consistent. No timing thresholds: figures belong in the bench's JSON, not in tests."""

from __future__ import annotations

import math

import pytest

from csm_plugin import bench_agent_turn as at
from csm_plugin.conversation.clauses import split_text
from csm_plugin.engine import Engine

pytestmark = pytest.mark.slow  # a bench: real-time pipelines through both frameworks

# Short stand-in delays and pieces: the plumbing is what is tested here.
QUICK = dict(turns=1, llm_first_token_ms=100.0, stt_final_ms=100.0, user_speech_timeout_s=0.2, max_audio_ms=400.0,
             voice_prompt_seconds=1.5)


@pytest.fixture(scope="module")
def engine(hf_checkpoint):
    engine = Engine.load(hf_checkpoint, slots=4)
    engine.warm_up()
    return engine


def test_llm_tokens_and_where_the_first_clause_ends():
    tokens = at.llm_tokens("I am sorry to hear that, let me look. Could you tell me?")
    assert tokens[:8] == ["I", " am", " sorry", " to", " hear", " that", ",", " let"]
    # the clause is known once the whitespace after its comma arrives: with the next word's token
    assert at.first_piece_token(tokens, "clause") == 7
    assert tokens[at.first_piece_token(tokens, "sentence")] == " Could"
    assert at.first_piece_token(at.llm_tokens("No punctuation here"), "clause") == 3  # only the end of the text
    for _, _, reply in at.SCRIPT:  # every scripted reply starts with a clause shorter than its first sentence
        assert "".join(at.llm_tokens(reply)) == reply
        assert at.first_piece_token(at.llm_tokens(reply), "clause") < at.first_piece_token(at.llm_tokens(reply), "sentence")


def check_adapter_section(section: dict, result: dict) -> None:
    line, _, reply = at.SCRIPT[0]
    history = section["history"]
    # The real adapter kept the conversation: the greeting, the user's turn with its own voice
    # (Mimi codes of the microphone audio), and the reply, all spoken by the model.
    assert history["user_texts"] == [line]
    assert history["user_turns_with_audio"] == 1
    assert history["voice_pinned"]
    assert history["agent_segments"] >= 2 and history["agent_segments_with_audio"] == history["agent_segments"]
    assert history["first_pieces"][0] in (split_text(reply, "clause")[0], split_text(reply, "sentence")[0])
    assert section["split"]["mode_observed"] in ("clause", "sentence")
    assert section["split"]["requested"] == "clause"
    turn = section["turns"][0]
    # The user's turn was recorded before the reply it conditions (whether before the LLM's first
    # token, the early prefill, depends on the machine's speed: a figure, not a test).
    assert section["user_turn_recorded_at_first_token"] in ("0 of 1", "1 of 1")
    assert 0 < turn["user_turn_recorded_ms"] < turn["first_audio_ms"]
    for key in ("first_audio_ms", "llm_first_token_to_first_audio_ms", "llm_first_clause_ms", "llm_first_token_ms",
                "voice_end_to_first_audio_ms"):
        assert turn[key] is not None and math.isfinite(turn[key]) and turn[key] > 0, key
        assert section[key] == turn[key]  # the p50 of one turn
    # Causality, not speed: audio cannot come before the text it speaks, nor the LLM before its request.
    assert turn["first_audio_ms"] > turn["llm_first_token_ms"] >= QUICK["llm_first_token_ms"] - 1
    piece = "llm_first_clause_ms" if section["split"]["mode_observed"] == "clause" else "llm_first_sentence_ms"
    assert turn["llm_first_token_to_first_audio_ms"] >= turn[piece]
    assert turn["voice_end_to_first_audio_ms"] > turn["first_audio_ms"]
    # The time after the clause, split where it goes: the adapter asked the service for the clause
    # after its last token, the service answered, the framework delivered it (the parts add up).
    if section["split"]["mode_observed"] == "clause":
        parts = [turn[k] for k in ("clause_to_speak_ms", "service_first_chunk_ms", "chunk_to_output_ms")]
        assert all(p >= 0 for p in parts) and parts[1] > 0
        assert sum(parts) == pytest.approx(turn["llm_first_token_to_first_audio_ms"] - turn["llm_first_clause_ms"], abs=1e-6)
    assert turn["user_turn_cached_ms"] >= turn["user_turn_recorded_ms"] > 0
    assert section["greeting_first_audio_ms"] > 0
    target = section["target"]
    assert target["limit_ms"] == pytest.approx(turn["llm_first_clause_ms"] + 2 * result["frame_step_ms"])
    assert target["met"] == (turn["llm_first_token_to_first_audio_ms"] <= target["limit_ms"])


@pytest.mark.parametrize("framework", ["pipecat", "livekit"])
def test_agent_turn_runs_through_the_real_adapter(engine, framework):
    pytest.importorskip("pipecat" if framework == "pipecat" else "livekit.agents")
    result = at.run(engine, frameworks=(framework,), **QUICK)
    assert result["settings"]["turns"] == 1 and result["settings"]["llm_tokens_per_s"] == 40.0
    assert list(result["versions"]) == ["pipecat-ai" if framework == "pipecat" else "livekit-agents"]
    assert result["llm_first_clause_ms"] == 25.0 * at.first_piece_token(at.llm_tokens(at.SCRIPT[0][2]))
    assert result["frame_step_ms"] > 0
    check_adapter_section(result[framework], result)
    assert set(at.target_summary(result)) == {framework}


def test_unknown_framework_and_split_are_refused(engine):
    with pytest.raises(ValueError, match="split"):
        at.run(engine, split="word", frameworks=())
    with pytest.raises(ValueError, match="unknown framework"):
        at.run(engine, frameworks=("gstreamer",), turns=1)


def test_an_adapter_that_fails_is_reported_not_waited_for(engine, monkeypatch):
    """A failing adapter ends its section with the error at once (no wait for the turn timeout),
    and the other adapter's figures still come."""
    pytest.importorskip("pipecat")
    pytest.importorskip("livekit.agents")
    from csm_plugin import bench
    from csm_plugin.errors import InputError

    conversation = bench.EngineService.conversation

    def refusing(self, conversation_id, **kwargs):
        if conversation_id == "bench-livekit":
            raise InputError("refused by the test")
        return conversation(self, conversation_id, **kwargs)

    monkeypatch.setattr(bench.EngineService, "conversation", refusing)
    result = at.run(engine, **{**QUICK, "timeout_s": 120.0})
    assert "refused by the test" in result["livekit"]["error"]
    check_adapter_section(result["pipecat"], result)
    assert set(at.target_summary(result)) == {"pipecat"}
