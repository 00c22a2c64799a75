"""Voices and styles files: one definition of named voice prompts and reply styles for the CLI,
the server, Pipecat and LiveKit (docs/voices.md).

A file (JSON, or TOML by its `.toml` extension) has up to two sections:

    {"voices": {"maya": {"text": "Thanks for calling, this is Maya.", "audio": "maya.wav"}},
     "styles": {"comforting": [{"speaker": 1, "text": "My flight got cancelled.", "audio": "c1_user.wav"},
                               {"speaker": 0, "text": "Oh no, I'm so sorry.", "audio": "c1_agent.wav"}]}}

Without sections, a name that maps to an object is a voice and one that maps to a list is a
style. Audio paths are relative to the file; any sample rate, mono. `load` checks everything,
the audio included (it is read here, with soundfile), so a bad file fails before a model loads,
with a `VoicesFileError` (an `InputError`) that names the file, the entry and the problem.
`register(service, file)` then adds every voice (`add_voice`) and style (`add_style`) to a
started service. Torch-free: only numpy and soundfile are imported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .audio import as_mono, read_mono
from .conversation.types import FRAME_MS, MAX_INPUT_RATE, MIN_INPUT_RATE, check_name, check_speaker, check_text
from .errors import AudioError, InputError

__all__ = ["MAX_CLIP_SECONDS", "MAX_RATE", "MIN_RATE", "ExemplarEntry", "Prompts", "StyleEntry", "VoiceEntry",
           "VoicePrompt", "VoicesFileError", "from_mapping", "load", "load_many", "read_clip", "register"]

MIN_RATE, MAX_RATE = MIN_INPUT_RATE, MAX_INPUT_RATE  # the service's input rates
MAX_CLIP_SECONDS = 30.0  # a prompt is conditioning, not content: 3-10 s is the sweet spot (docs/voices.md)
SECTIONS = ("voices", "styles")
_VOICE_KEYS = {"text", "audio"}
_EXEMPLAR_KEYS = {"speaker", "text", "audio"}


class VoicesFileError(InputError):
    """A voices or styles file that cannot be used; the message names the file, the entry and
    the problem."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing audio arrays element-wise means nothing here
class VoicePrompt:
    """A voice given directly (not from a file): a reference clip and its exact transcript. Both
    adapters take it (`CSMTTSService(voice_prompt=...)`, `csm.TTS(voice=...)`) and register it on
    their backend once, under `name`, derived from its content: the same clip and transcript give
    the same name in every pipeline and process, so a shared backend holds it once (and shares
    its prefilled cache rows across conversations).

    audio: mono samples (numpy array or list; int16 PCM, or float in [-1, 1]); sample_rate: Hz.
    """

    text: str
    audio: Any
    sample_rate: int

    def __post_init__(self):
        check_text(self.text)
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, np.integer)) or self.sample_rate <= 0:
            raise AudioError(f"voice prompt sample_rate must be a positive int, got {self.sample_rate!r}")
        try:
            wav = as_mono(self.audio)
        except (TypeError, ValueError) as e:  # AudioError is a ValueError; a list of strings is a plain one
            raise e if isinstance(e, AudioError) else AudioError(f"voice prompt audio must be an array of samples: {e}") from None
        if len(wav) < self.sample_rate * FRAME_MS // 1000:
            raise AudioError(f"voice prompt audio is shorter than one {FRAME_MS} ms frame")

    @property
    def name(self) -> str:
        digest = hashlib.sha256()
        digest.update(check_text(self.text).encode("utf-8"))
        digest.update(int(self.sample_rate).to_bytes(8, "little"))
        digest.update(as_mono(self.audio).tobytes())  # as float32 samples, whatever dtype they came in
        return f"voice-prompt-{digest.hexdigest()[:16]}"

    async def register(self, backend: Any) -> str:
        """Register this prompt on `backend` (anything with `add_voice`) under `name`, once per
        backend however many pipelines or TTS objects ask, and return the name. Callers that
        start together wait for one registration instead of each encoding the clip."""
        name = self.name
        try:
            registered = _registrations.setdefault(backend, {})
        except TypeError:  # a backend that cannot be weakly referenced: register it every time
            registered = {}
        task = registered.get(name)
        loop = asyncio.get_running_loop()
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return name  # registered already (possibly from another event loop)
        if task is None or task.done() or task.get_loop() is not loop:
            task = registered[name] = loop.create_task(
                backend.add_voice(name, text=self.text, audio=self.audio, sample_rate=self.sample_rate)
            )
        # shielded: a caller that is cancelled while the clip is encoded does not cancel it for the others
        await asyncio.shield(task)
        return name

    @classmethod
    def of(cls, value: VoicePrompt | tuple) -> VoicePrompt:
        """A VoicePrompt, or one from a (text, audio, sample_rate) tuple."""
        if isinstance(value, VoicePrompt):
            return value
        if isinstance(value, tuple) and len(value) == 3:
            return cls(*value)
        raise InputError(f"a voice prompt must be a VoicePrompt or a (text, audio, sample_rate) tuple, got {type(value).__name__}")


# VoicePrompt.register's registrations (tasks), per backend: weak keys, so a closed backend goes.
_registrations: weakref.WeakKeyDictionary[Any, dict[str, asyncio.Task]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class VoiceEntry:
    """A named voice prompt: a transcript and its audio (mono float32 samples at `sample_rate`)."""

    name: str
    text: str
    path: Path
    audio: np.ndarray = field(repr=False)
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


@dataclass(frozen=True, eq=False)
class ExemplarEntry:
    """One line of a style's example exchange: who says it, the words, and how (the audio)."""

    speaker: int
    text: str
    path: Path
    audio: np.ndarray = field(repr=False)
    sample_rate: int


@dataclass(frozen=True, eq=False)
class StyleEntry:
    """A named style: exemplars (oldest first) a styled reply is conditioned on, placed just
    before it and never recorded in the conversation's history."""

    name: str
    exemplars: tuple[ExemplarEntry, ...]


@dataclass(frozen=True, eq=False)
class Prompts:
    """The voices and styles of one or more files, checked and with their audio read."""

    voices: dict[str, VoiceEntry] = field(default_factory=dict)
    styles: dict[str, StyleEntry] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.voices or self.styles)

    def voice(self, name: str) -> VoiceEntry:
        """The voice `name`; VoicesFileError listing the known names if there is none."""
        if name not in self.voices:
            raise VoicesFileError(f"unknown voice {name!r}; {_known('voices', self.voices, self.sources)}")
        return self.voices[name]

    def style(self, name: str) -> StyleEntry:
        """The style `name`; VoicesFileError listing the known names if there is none."""
        if name not in self.styles:
            raise VoicesFileError(f"unknown style {name!r}; {_known('styles', self.styles, self.sources)}")
        return self.styles[name]

    def merged(self, other: Prompts) -> Prompts:
        """Both sets of entries; a name defined in both is an error (which one would win is not obvious)."""
        for what, mine, theirs in (("voice", self.voices, other.voices), ("style", self.styles, other.styles)):
            twice = sorted(set(mine) & set(theirs))
            if twice:
                raise VoicesFileError(
                    f"{what} {twice[0]!r} is defined twice: in {_where(self.sources)} and in {_where(other.sources)}"
                )
        return Prompts({**self.voices, **other.voices}, {**self.styles, **other.styles}, self.sources + other.sources)


def _known(what: str, names: Iterable[str], sources: tuple[str, ...]) -> str:
    names = sorted(names)
    if not sources:
        return f"no {what} are loaded (give a voices file)"
    return f"{_where(sources)} define(s) {what} {names}" if names else f"{_where(sources)} define(s) no {what}"


def _where(sources: tuple[str, ...]) -> str:
    return ", ".join(sources) or "(nothing)"


# --- reading ------------------------------------------------------------------------------------


def load(path: str | Path) -> Prompts:
    """Read and check a voices/styles file (JSON, or TOML for a `.toml` name), reading every
    audio file it names; VoicesFileError says what is wrong and where."""
    path = Path(path)
    data = _parse(path)
    return from_mapping(data, base=path.parent, source=str(path))


def load_many(paths: Iterable[str | Path]) -> Prompts:
    """Several files as one set of names (say, voices in one file and styles in another); a name
    defined twice is an error."""
    prompts = Prompts()
    for path in paths:
        prompts = prompts.merged(load(path))
    return prompts


def _parse(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise VoicesFileError(f"cannot read voices file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise VoicesFileError(f"{path}: TOML needs Python 3.11+ (or `pip install tomli`); or write the file as JSON") from None
        try:
            return tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise VoicesFileError(f"{path}: not valid TOML: {e}") from None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise VoicesFileError(f"{path}: the name {e.args[0]!r} appears twice in one object") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VoicesFileError(f"{path}: not valid JSON: {e}") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def from_mapping(data: Any, *, base: str | Path = ".", source: str = "<voices>") -> Prompts:
    """Check parsed file content (the JSON/TOML values) and read its audio; paths are relative
    to `base`. `source` names the content in errors (a file name)."""
    base = Path(base)
    if not isinstance(data, Mapping):
        raise VoicesFileError(f"{source}: expected an object of voices and styles ({{\"voices\": {{...}}, \"styles\": {{...}}}}), "
                              f"got {_kind(data)}")
    if any(key in data for key in SECTIONS):
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise VoicesFileError(f"{source}: unknown section {unknown[0]!r}; a file with sections has only 'voices' and 'styles'")
        voices, styles = data.get("voices", {}), data.get("styles", {})
        for name, section in (("voices", voices), ("styles", styles)):
            if not isinstance(section, Mapping):
                raise VoicesFileError(f"{source}: '{name}' must be an object of names, got {_kind(section)}")
    else:  # flat: an object is a voice, a list is a style
        voices = {k: v for k, v in data.items() if not isinstance(v, list)}
        styles = {k: v for k, v in data.items() if isinstance(v, list)}
    return Prompts(
        {name: _voice(source, base, name, entry) for name, entry in voices.items()},
        {name: _style(source, base, name, entry) for name, entry in styles.items()},
        (source,),
    )


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return {str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _name(source: str, name: Any, what: str) -> str:
    try:
        return check_name(name, what)
    except InputError as e:
        raise VoicesFileError(f"{source}: {e}") from None


def _voice(source: str, base: Path, name: Any, entry: Any) -> VoiceEntry:
    name = _name(source, name, "voice")
    where = f"{source}: voice {name!r}"
    if not isinstance(entry, Mapping):
        raise VoicesFileError(f"{where}: expected an object {{\"text\": ..., \"audio\": ...}}, got {_kind(entry)}")
    _check_keys(where, entry, _VOICE_KEYS)
    text = _text(where, entry["text"])
    path, audio, rate = _clip(where, base, entry["audio"])
    return VoiceEntry(name, text, path, audio, rate)


def _style(source: str, base: Path, name: Any, entry: Any) -> StyleEntry:
    name = _name(source, name, "style")
    where = f"{source}: style {name!r}"
    if not isinstance(entry, list) or not entry:
        raise VoicesFileError(f"{where}: expected a non-empty list of exemplars "
                              f"[{{\"speaker\": 0, \"text\": ..., \"audio\": ...}}], got {_kind(entry)}")
    exemplars = []
    for i, item in enumerate(entry):
        here = f"{where}, exemplar {i}"
        if not isinstance(item, Mapping):
            raise VoicesFileError(f"{here}: expected an object {{\"speaker\": ..., \"text\": ..., \"audio\": ...}}, got {_kind(item)}")
        _check_keys(here, item, _EXEMPLAR_KEYS)
        try:
            speaker = check_speaker(item["speaker"])
        except InputError as e:
            raise VoicesFileError(f"{here}: {e}") from None
        text = _text(here, item["text"])
        path, audio, rate = _clip(here, base, item["audio"])
        exemplars.append(ExemplarEntry(speaker, text, path, audio, rate))
    return StyleEntry(name, tuple(exemplars))


def _check_keys(where: str, entry: Mapping, required: set[str]) -> None:
    missing = sorted(required - set(entry))
    if missing:
        raise VoicesFileError(f"{where}: missing {', '.join(repr(m) for m in missing)} (needs {', '.join(sorted(required))})")
    unknown = sorted(set(entry) - required)
    if unknown:
        raise VoicesFileError(f"{where}: unknown field {unknown[0]!r} (the fields are {', '.join(sorted(required))})")


def _text(where: str, text: Any) -> str:
    try:
        return check_text(text)
    except InputError as e:
        raise VoicesFileError(f"{where}: 'text': {e}") from None


def _clip(where: str, base: Path, audio: Any) -> tuple[Path, np.ndarray, int]:
    if not isinstance(audio, str) or not audio.strip():
        raise VoicesFileError(f"{where}: 'audio' must be the path of an audio file (relative to the file), got {audio!r}")
    path = base / audio
    try:
        samples, rate = read_clip(path)
    except InputError as e:
        raise VoicesFileError(f"{where}: audio {audio!r}: {e}") from None
    return path, samples, rate


def read_clip(path: str | Path) -> tuple[np.ndarray, int]:
    """A prompt's audio file as (mono float32 samples, sample rate), checked as the service
    will check it (rate, length, finite samples); InputError otherwise."""
    path = Path(path)
    try:
        wav, rate = read_mono(path)
    except AudioError as e:
        raise InputError(str(e)) from None
    wav = np.array(wav, dtype=np.float32)  # a copy of our own: it is made read-only below
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InputError(f"{path} is at {rate} Hz; the sample rate must be {MIN_RATE}..{MAX_RATE} Hz")
    seconds = len(wav) / rate
    if len(wav) < rate * FRAME_MS // 1000:
        raise InputError(f"{path} is {seconds * 1000:.0f} ms long, shorter than one {FRAME_MS} ms frame")
    if seconds > MAX_CLIP_SECONDS:
        raise InputError(f"{path} is {seconds:.1f} s long, at most {MAX_CLIP_SECONDS:g} s (3-10 s is best): trim it")
    if not np.isfinite(wav).all():
        raise InputError(f"{path} contains NaN or infinite samples")
    if not np.any(wav):
        raise InputError(f"{path} is silent")
    wav.flags.writeable = False
    return wav, int(rate)


# --- registering --------------------------------------------------------------------------------


async def register(service: Any, prompts: str | Path | Prompts | Iterable[str | Path]) -> Prompts:
    """Add every voice (`service.add_voice`) and style (`service.add_style`) of `prompts` (a
    file, several files, or what `load` returned) to a started service; returns what was
    added. Every file is checked before anything is added, so a bad file changes nothing."""
    if not isinstance(prompts, Prompts):
        prompts = load(prompts) if isinstance(prompts, (str, Path)) else load_many(prompts)
    if prompts.styles and not hasattr(service, "add_style"):
        raise VoicesFileError(f"{_where(prompts.sources)} define(s) styles, but {type(service).__name__} has no add_style()")
    for voice in prompts.voices.values():
        await service.add_voice(voice.name, text=voice.text, audio=voice.audio, sample_rate=voice.sample_rate)
    if prompts.styles:
        exemplar = _exemplar_type()
        for style in prompts.styles.values():
            await service.add_style(
                style.name, [exemplar(e.speaker, e.text, e.audio, e.sample_rate) for e in style.exemplars]
            )
    return prompts


def _exemplar_type():
    """csm_plugin.service.Exemplar (imported only when styles are registered: it loads torch)."""
    from .service import Exemplar

    return Exemplar
