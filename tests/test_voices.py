"""Voices and styles files (csm_plugin.voices): the format, its checks (each broken file is a
VoicesFileError naming the file, the entry and the problem), registering on a service, and the
example file with its placeholder clips."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_plugin import voices
from csm_plugin.errors import InputError
from csm_plugin.voices import VoicesFileError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "voices"


def _placeholders_module():
    spec = importlib.util.spec_from_file_location("make_placeholders", EXAMPLE / "make_placeholders.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_placeholders = _placeholders_module()


def example_copy(folder: Path) -> Path:
    """The example voices file in `folder`, with placeholder clips beside it."""
    target = folder / "voices.json"
    target.write_text((EXAMPLE / "voices.json").read_text())
    make_placeholders.make_placeholders(target)
    return target


def tone(path: Path, seconds: float = 1.0, rate: int = 16_000, channels: int = 1, amplitude: float = 0.3) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wav = (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    sf.write(str(path), np.stack([wav] * channels, axis=1) if channels > 1 else wav, rate)
    return path


# --- valid files -------------------------------------------------------------------------------


def test_the_example_file_loads_with_its_four_styles(tmp_path):
    path = example_copy(tmp_path)
    prompts = voices.load(path)
    assert sorted(prompts.voices) == ["caller", "maya"]
    assert sorted(prompts.styles) == ["casual", "comforting", "formal", "motivating"]
    maya = prompts.voice("maya")
    assert maya.text.startswith("Hi, thanks for calling.") and maya.path == tmp_path / "maya.wav"
    wav, rate = sf.read(tmp_path / "maya.wav", dtype="float32")
    assert maya.sample_rate == rate and np.array_equal(maya.audio, wav)  # the clip, read relative to the file
    comforting = prompts.style("comforting").exemplars
    assert [(e.speaker, e.path.name) for e in comforting] == [(1, "comforting_user.wav"), (0, "comforting_agent.wav")]
    assert all(3.0 <= len(e.audio) / e.sample_rate <= 8.0 for e in comforting)
    assert prompts.sources == (str(path),)


def test_flat_files_toml_and_several_files(tmp_path):
    tone(tmp_path / "v.wav")
    tone(tmp_path / "s.wav", rate=44_100)
    (tmp_path / "flat.json").write_text(json.dumps({
        "agent": {"text": "Hello, this is the agent.", "audio": "v.wav"},  # an object: a voice
        "calm": [{"speaker": 0, "text": "Take your time.", "audio": "s.wav"}],  # a list: a style
    }))
    flat = voices.load(tmp_path / "flat.json")
    assert list(flat.voices) == ["agent"] and list(flat.styles) == ["calm"]
    assert flat.styles["calm"].exemplars[0].sample_rate == 44_100
    (tmp_path / "sub").mkdir()
    tone(tmp_path / "sub" / "w.wav")
    (tmp_path / "sub" / "more.toml").write_text(
        '[voices.other]\ntext = "Another voice."\naudio = "w.wav"\n\n'
        '[[styles.brisk]]\nspeaker = 0\ntext = "Right away."\naudio = "../s.wav"\n'
    )
    toml = voices.load(tmp_path / "sub" / "more.toml")
    assert toml.voices["other"].path == tmp_path / "sub" / "w.wav"  # relative to its own file
    assert toml.styles["brisk"].exemplars[0].text == "Right away."
    both = voices.load_many([tmp_path / "flat.json", tmp_path / "sub" / "more.toml"])
    assert sorted(both.voices) == ["agent", "other"] and sorted(both.styles) == ["brisk", "calm"]
    with pytest.raises(VoicesFileError, match=r"voice 'agent' is defined twice: in .*flat.json and in .*flat.json"):
        voices.load_many([tmp_path / "flat.json", tmp_path / "flat.json"])
    assert not voices.load_many([])  # no files: nothing, and falsy
    with pytest.raises(VoicesFileError, match=r"unknown voice 'nobody'; .*flat.json define\(s\) voices \['agent'\]"):
        flat.voice("nobody")
    with pytest.raises(VoicesFileError, match="unknown style 'loud'; no styles are loaded"):
        voices.Prompts().style("loud")


# --- broken files ------------------------------------------------------------------------------

GOOD_VOICE = {"text": "Hello there.", "audio": "ok.wav"}
GOOD_EXEMPLAR = {"speaker": 0, "text": "Of course.", "audio": "ok.wav"}

BROKEN = [
    ("not json", "{", "not valid JSON"),
    ("a list", [GOOD_VOICE], "expected an object of voices and styles"),
    ("unknown section", {"voices": {}, "extras": {}}, "unknown section 'extras'"),
    ("voices not an object", {"voices": ["a"]}, "'voices' must be an object of names, got a list"),
    ("styles not an object", {"styles": "formal"}, "'styles' must be an object of names, got a string"),
    ("bad voice name", {"voices": {"my voice": GOOD_VOICE}}, "voice name must be 1-64 letters"),
    ("bad style name", {"styles": {"-x": [GOOD_EXEMPLAR]}}, "style name must be 1-64 letters"),
    ("voice not an object", {"voices": {"a": "ok.wav"}}, "voice 'a': expected an object"),
    ("voice without text", {"voices": {"a": {"audio": "ok.wav"}}}, "voice 'a': missing 'text'"),
    ("voice without audio", {"voices": {"a": {"text": "Hi."}}}, "voice 'a': missing 'audio'"),
    ("typo in a field", {"voices": {"a": {**GOOD_VOICE, "transcript": "x"}}}, "voice 'a': unknown field 'transcript'"),
    ("empty text", {"voices": {"a": {**GOOD_VOICE, "text": "  "}}}, "voice 'a': 'text': text is empty"),
    ("text not a string", {"voices": {"a": {**GOOD_VOICE, "text": 5}}}, "voice 'a': 'text': text must be a str"),
    ("audio not a string", {"voices": {"a": {**GOOD_VOICE, "audio": 5}}}, "voice 'a': 'audio' must be the path of an audio file"),
    ("missing audio file", {"voices": {"a": {**GOOD_VOICE, "audio": "gone.wav"}}}, "voice 'a': audio 'gone.wav': file .*gone.wav does not exist"),
    ("audio is a folder", {"voices": {"a": {**GOOD_VOICE, "audio": "."}}}, "voice 'a': audio '.': .* is not a file"),
    ("not audio", {"voices": {"a": {**GOOD_VOICE, "audio": "notes.txt"}}}, "voice 'a': audio 'notes.txt': cannot read .*notes.txt as audio"),
    ("stereo", {"voices": {"a": {**GOOD_VOICE, "audio": "stereo.wav"}}}, "voice 'a': audio 'stereo.wav': .* has 2 channels"),
    ("too short", {"voices": {"a": {**GOOD_VOICE, "audio": "short.wav"}}}, "shorter than one 80 ms frame"),
    ("too long", {"voices": {"a": {**GOOD_VOICE, "audio": "long.wav"}}}, r"is 31.0 s long, at most 30 s"),
    ("rate too low", {"voices": {"a": {**GOOD_VOICE, "audio": "4k.wav"}}}, "is at 4000 Hz; the sample rate must be 8000..192000 Hz"),
    ("silent", {"voices": {"a": {**GOOD_VOICE, "audio": "silent.wav"}}}, "voice 'a': audio 'silent.wav': .* is silent"),
    ("empty style", {"styles": {"calm": []}}, "style 'calm': expected a non-empty list of exemplars .* got an empty list"),
    ("exemplar not an object", {"styles": {"calm": ["ok.wav"]}}, "style 'calm', exemplar 0: expected an object"),
    ("exemplar without speaker", {"styles": {"calm": [GOOD_EXEMPLAR, {"text": "Hi.", "audio": "ok.wav"}]}},
     "style 'calm', exemplar 1: missing 'speaker'"),
    ("negative speaker", {"styles": {"calm": [{**GOOD_EXEMPLAR, "speaker": -1}]}}, "exemplar 0: speaker must be a non-negative int"),
    ("boolean speaker", {"styles": {"calm": [{**GOOD_EXEMPLAR, "speaker": True}]}}, "exemplar 0: speaker must be a non-negative int"),
    ("exemplar without audio file", {"styles": {"calm": [{**GOOD_EXEMPLAR, "audio": "gone.wav"}]}},
     "style 'calm', exemplar 0: audio 'gone.wav': file .* does not exist"),
]


@pytest.mark.parametrize("content,says", [(c, s) for _, c, s in BROKEN], ids=[name for name, _, _ in BROKEN])
def test_each_broken_file_is_a_typed_error_naming_the_problem(tmp_path, content, says):
    tone(tmp_path / "ok.wav")
    tone(tmp_path / "stereo.wav", channels=2)
    tone(tmp_path / "short.wav", seconds=0.04)
    tone(tmp_path / "long.wav", seconds=31.0, rate=8_000)
    tone(tmp_path / "4k.wav", rate=4_000)
    tone(tmp_path / "silent.wav", amplitude=0.0)
    (tmp_path / "notes.txt").write_text("not audio")
    path = tmp_path / "voices.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(VoicesFileError, match=says) as error:
        voices.load(path)
    assert isinstance(error.value, InputError)  # the CLI's one-line exit 2, the server's 4xx
    assert str(error.value).startswith(f"{path}: ")  # names the file first


def test_duplicate_names_unreadable_files_and_bad_toml(tmp_path):
    tone(tmp_path / "ok.wav")
    path = tmp_path / "voices.json"
    path.write_text('{"voices": {"a": {"text": "Hi.", "audio": "ok.wav"}, "a": {"text": "Ho.", "audio": "ok.wav"}}}')
    with pytest.raises(VoicesFileError, match="the name 'a' appears twice"):  # JSON would keep the last one silently
        voices.load(path)
    with pytest.raises(VoicesFileError, match=r"cannot read voices file .*missing.json"):
        voices.load(tmp_path / "missing.json")
    (tmp_path / "bad.toml").write_text("[voices.a\ntext = 1")
    with pytest.raises(VoicesFileError, match=r"bad.toml: not valid TOML"):
        voices.load(tmp_path / "bad.toml")
    (tmp_path / "bytes.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(VoicesFileError, match="not valid JSON"):
        voices.load(tmp_path / "bytes.json")


# --- registering ---------------------------------------------------------------------------------


class FakeService:
    """Records what register() adds (add_voice / add_style as CSMService has them)."""

    def __init__(self, styles: bool = True):
        self.calls = []
        if styles:
            self.add_style = self._add_style

    async def add_voice(self, name, *, text, audio, sample_rate):
        self.calls.append(("voice", name, text, audio, sample_rate))

    async def _add_style(self, name, exemplars):
        self.calls.append(("style", name, list(exemplars)))


def test_register_adds_every_voice_and_style(tmp_path):
    from csm_plugin.service import Exemplar

    path = example_copy(tmp_path)
    service = FakeService()
    prompts = asyncio.run(voices.register(service, path))
    added_voices = {c[1]: c for c in service.calls if c[0] == "voice"}
    added_styles = {c[1]: c[2] for c in service.calls if c[0] == "style"}
    assert sorted(added_voices) == ["caller", "maya"] and sorted(added_styles) == sorted(prompts.styles)
    _, _, text, audio, rate = added_voices["maya"]
    wav, file_rate = sf.read(tmp_path / "maya.wav", dtype="float32")
    assert text == prompts.voices["maya"].text and rate == file_rate and np.array_equal(audio, wav)
    formal = added_styles["formal"]
    assert all(isinstance(e, Exemplar) for e in formal)
    assert [(e.speaker, e.text) for e in formal] == [(e.speaker, e.text) for e in prompts.styles["formal"].exemplars]
    assert np.array_equal(formal[1].audio, sf.read(tmp_path / "formal_agent.wav", dtype="float32")[0])


def test_register_checks_everything_before_adding_anything(tmp_path):
    path = example_copy(tmp_path)
    (tmp_path / "formal_agent.wav").write_text("broken")  # the last clip of one style
    service = FakeService()
    with pytest.raises(VoicesFileError, match="style 'formal', exemplar 1: audio 'formal_agent.wav': cannot read"):
        asyncio.run(voices.register(service, path))
    assert service.calls == []  # nothing registered
    make_placeholders.make_placeholders(path, force=True)
    no_styles = FakeService(styles=False)
    with pytest.raises(VoicesFileError, match="define.* styles, but FakeService has no add_style"):
        asyncio.run(voices.register(no_styles, path))
    assert no_styles.calls == []


def test_register_on_a_real_service_conditions_replies(hf_checkpoint, tmp_path):
    from csm_plugin.service import CSMService

    path = example_copy(tmp_path)

    async def reply(service, conversation_id, text, voices_=None, **options):
        conv = service.conversation(conversation_id, voices=voices_)
        pcm = [chunk.pcm async for chunk in conv.speak(text, seed=5, max_audio_ms=400, **options)]
        history = [turn.origin for turn in conv.turns]
        await conv.close()
        return np.concatenate(pcm), history

    async def main():
        async with CSMService(hf_checkpoint, max_cached_conversations=2) as service:
            prompts = await voices.register(service, path)
            assert service.voices == sorted(prompts.voices) and service.styles == sorted(prompts.styles)
            plain, _ = await reply(service, "plain", "Sure, I can help.")
            voiced, history = await reply(service, "voiced", "Sure, I can help.", {0: "maya"})
            assert history == ["voice", "agent"]
            styled, history = await reply(service, "styled", "Sure, I can help.", style="comforting")
            assert history == ["agent"]  # the exemplars conditioned the reply but are not in the history
            tagged, _ = await reply(service, "tagged", "[comforting] Sure, I can help.")
            return plain, voiced, styled, tagged

    plain, voiced, styled, tagged = asyncio.run(main())
    n = min(len(plain), len(voiced), len(styled))
    assert not np.array_equal(plain[:n], voiced[:n]) and not np.array_equal(plain[:n], styled[:n])
    assert np.array_equal(tagged, styled)  # a leading tag is the same as style=


# --- the placeholder script ----------------------------------------------------------------------


def test_placeholder_script_keeps_existing_clips_unless_forced(tmp_path):
    path = tmp_path / "voices.json"
    path.write_text((EXAMPLE / "voices.json").read_text())
    assert make_placeholders.main([str(path)]) == 0
    written = sorted(tmp_path.glob("*.wav"))
    assert len(written) == 10
    recording = tone(tmp_path / "maya.wav", seconds=2.0)  # a real recording replaces a placeholder
    before = recording.read_bytes()
    assert make_placeholders.make_placeholders(path) == []  # nothing missing: nothing written
    assert recording.read_bytes() == before
    assert recording in make_placeholders.make_placeholders(path, force=True)
    assert recording.read_bytes() != before
    # styles sound different from each other (pitch, pace, loudness), and the same each time
    formal = make_placeholders.placeholder("Certainly, I will check.", "formal")
    assert np.array_equal(formal, make_placeholders.placeholder("Certainly, I will check.", "formal"))
    assert np.abs(make_placeholders.placeholder("Certainly, I will check.", "motivating")).max() > np.abs(formal).max()


def test_voices_module_stays_torch_free():
    import subprocess

    code = "import sys, csm_plugin.voices; print('torch' in sys.modules, 'pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.split() == ["False", "False"]
