"""bench/gpu_check.sh --dry-run: the one-shot GPU check's steps at tiny size on CPU, so that its
arguments, file names and the JSON keys its summary reads are proven before it meets a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "first_audio_warm_ms": "first audio, warm conversation",
    "real_time_factor": "real-time factor, one stream",
    "realtime_streams": "streams that stay real time",
    "speedup_vs_transformers": "throughput vs transformers generate",
    "new_conversation_voice_vs_warm": "new conversation + voice / warm",
}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GPU_CHECK_RUNNING") == "1", reason="started by gpu_check.sh itself")
def test_gpu_check_dry_run_writes_every_file_and_target(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PYTHON=sys.executable)  # the interpreter running these tests
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--no-wheels", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    steps = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "steps.tsv").read_text().splitlines()}
    assert steps == dict.fromkeys(["env", "wheels", "cuda-tests", "bench-eager", "bench-graphs", "bench-compiled", "summary"], "ok")
    assert "torch" in json.loads((out / "env.json").read_text())
    xmls = sorted(out.glob("pytest-cuda-*.xml"))  # one pytest process per file with CUDA tests
    assert len(xmls) >= 2 and all("tests=" in x.read_text() for x in xmls)  # collected (and skipped)

    for name, compile in (("bench-compiled", True), ("bench-graphs", "graphs"), ("bench-eager", False)):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["settings"]["size"] == "tiny" and result["settings"]["compile"] == compile
        assert result["settings"]["cuda_graphs"] is False  # (a CPU)
        assert result["per_frame"]["real_time_factor"] > 0
    compiled = json.loads((out / "bench-compiled.json").read_text())
    assert "baseline_transformers_generate" in compiled and compiled["settings"]["compile_batches"] == [1, 2]
    for adapter in ("pipecat", "livekit"):  # the agent turn ran through both adapters
        assert compiled["agent_turn"][adapter]["first_audio_ms"] > 0

    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "MISSING" not in summary
    assert "agent turn, pipecat" in summary and "agent turn, livekit" in summary
    for what in TARGETS.values():
        assert what in summary
    targets = json.loads((out / "summary.json").read_text())["targets"]
    assert {t["target"] for t in targets} == set(TARGETS)
    assert all(t["result"] in ("PASS", "FAIL") and t["measured"] is not None for t in targets)
    assert all(t["source"] == "bench-compiled" for t in targets)
