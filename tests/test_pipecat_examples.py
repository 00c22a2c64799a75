"""examples/pipecat_local_agent.py with its voice and split options, offline, as a subprocess (the
plain run is in tests/test_examples.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from test_examples import run_example, wav_seconds

pytest.importorskip("pipecat")

VOICE_TEXT = "Thanks for calling, this is Maya."


@pytest.mark.slow
def test_local_agent_speaks_in_the_given_voice_sentence_by_sentence(tmp_path):
    rate = 16_000
    t = np.arange(rate) / rate
    sf.write(tmp_path / "maya.wav", (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate)
    done = run_example("pipecat_local_agent.py", "--test-checkpoint", "--say", "It was a blue jacket.",
                       "--voice-wav", str(tmp_path / "maya.wav"), "--voice-text", VOICE_TEXT, "--split", "sentence",
                       "--max-audio-ms", "320", "--wav", str(tmp_path / "agent.wav"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert lines[0] == f"voice: {VOICE_TEXT}  [13 audio frames]"  # pinned first: 1 s at 12.5 Hz
    # whole sentences (in clause mode "I found the order," would be a piece of its own)
    assert any(line.startswith("agent: I found the order, and it is at the depot.  [") for line in lines)
    assert wav_seconds(tmp_path / "agent.wav") > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--voice-wav", "maya.wav"], "--voice-wav and --voice-text go together"),
        (["--voice-wav", "missing.wav", "--voice-text", VOICE_TEXT], "missing.wav does not exist"),
        (["--split", "word"], "invalid choice: 'word'"),
    ],
)
def test_local_agent_voice_mistakes_are_one_line_before_loading(tmp_path, args, message):
    done = run_example("pipecat_local_agent.py", "--test-checkpoint", "--say", "Hi.", *args, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert "test checkpoint" not in done.stderr  # refused before any model was made or loaded
