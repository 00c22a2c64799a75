"""The command line: speak, demo, make-test-checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from csm_plugin.cli import main
from csm_plugin.models.loading import load_checkpoint


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wav = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def speak(ckpt, out, *extra):
    return main(["speak", "--model", str(ckpt), "--text", "Hello there.", "--seed", "3", "--out", str(out), *extra])


def test_speak_writes_a_wav_matching_its_frames(hf_checkpoint, tmp_path):
    assert speak(hf_checkpoint, tmp_path / "a.wav", "--codes", str(tmp_path / "a.npy")) == 0
    wav, rate = sf.read(tmp_path / "a.wav", dtype="int16")
    codes = np.load(tmp_path / "a.npy")
    info = sf.info(tmp_path / "a.wav")
    assert rate == 24_000 and info.channels == 1 and info.subtype == "PCM_16"
    assert codes.ndim == 2 and codes.shape[1] == 32 and len(wav) == codes.shape[0] * 1920 > 0
    assert np.abs(wav).max() > 0
    # the same seed gives the same audio; another seed does not
    assert speak(hf_checkpoint, tmp_path / "b.wav") == 0
    assert speak(hf_checkpoint, tmp_path / "c.wav", "--seed", "4") == 0
    assert np.array_equal(sf.read(tmp_path / "b.wav", dtype="int16")[0], wav)
    other = sf.read(tmp_path / "c.wav", dtype="int16")[0]
    n = min(len(other), len(wav))
    assert not np.array_equal(other[:n], wav[:n])


def test_context_audio_at_any_rate_conditions_the_reply(hf_checkpoint, tmp_path):
    sf.write(tmp_path / "u16k.wav", tone(1.0, 16_000), 16_000)
    sf.write(tmp_path / "u44k.wav", tone(1.0, 44_100), 44_100)
    (tmp_path / "ctx.json").write_text(json.dumps([
        {"speaker": 1, "text": "Hi, I have a question.", "audio": "u16k.wav"},
        {"speaker": 0, "text": "Sure, go ahead."},
        {"speaker": 1, "text": "It is about my bill.", "audio": "u44k.wav"},
    ]))
    assert speak(hf_checkpoint, tmp_path / "ctx.wav", "--context", str(tmp_path / "ctx.json")) == 0
    assert speak(hf_checkpoint, tmp_path / "plain.wav") == 0
    with_ctx, plain = sf.read(tmp_path / "ctx.wav")[0], sf.read(tmp_path / "plain.wav")[0]
    n = min(len(with_ctx), len(plain))
    assert not np.allclose(with_ctx[:n], plain[:n])  # the context changed what was said


@pytest.mark.parametrize("audio,message", [(tone(1.0, 16_000, channels=2), "channels"), (np.zeros(0, np.float32), "")])
def test_stereo_or_empty_context_audio_is_a_clear_error(hf_checkpoint, tmp_path, capsys, audio, message):
    sf.write(tmp_path / "bad.wav", audio, 16_000)
    (tmp_path / "ctx.json").write_text(json.dumps([{"speaker": 1, "text": "Hi.", "audio": "bad.wav"}]))
    assert speak(hf_checkpoint, tmp_path / "x.wav", "--context", str(tmp_path / "ctx.json")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("channels" in err if message else "empty" in err or "cannot read" in err)
    assert not (tmp_path / "x.wav").exists()


def test_unavailable_model_says_how_to_fix_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["speak", "--model", "sesame/csm-1b", "--text", "Hi.", "--out", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "sesame/csm-1b" in err and "make-test-checkpoint" in err


def test_make_test_checkpoint_and_demo(tmp_path, monkeypatch, capsys):
    assert main(["make-test-checkpoint", str(tmp_path / "ckpt"), "--format", "sesame", "--seed", "2"]) == 0
    assert load_checkpoint(tmp_path / "ckpt").format == "sesame"
    assert main(["demo", "--model", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path / "out")]) == 0
    lines = sorted(p.name for p in (tmp_path / "out").glob("*.wav"))
    assert lines == ["demo_1_speaker0.wav", "demo_2_speaker1.wav", "demo_3_speaker0.wav", "demo_conversation.wav"]
    total = sum(len(sf.read(tmp_path / "out" / n)[0]) for n in lines[:3])
    assert len(sf.read(tmp_path / "out" / "demo_conversation.wav")[0]) == total
