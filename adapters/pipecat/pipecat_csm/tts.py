"""CSMTTSService: Sesame CSM speech for Pipecat pipelines, conditioned on the whole conversation.

Drop it in where another TTS goes:

    tts = CSMTTSService(settings=CSMTTSService.Settings(temperature=0.8))
    pipeline = Pipeline([transport.input(), stt, context_aggregator.user(), llm, tts,
                         transport.output(), context_aggregator.assistant()])

The service keeps one csm-plugin conversation per pipeline. It listens to the frames the standard
aggregators already send through it: each user turn (`LLMContextUserTurnFrame`) is added with the
user's own audio for that turn (`InputAudioRawFrame`s between `UserStartedSpeakingFrame` and
`UserStoppedSpeakingFrame`), and every reply is recorded as it is generated. On a barge-in the
conversation keeps only the audio (and the words) that were played.

LLM text is cut at clause boundaries (`split="clause"`, csm_plugin's one clause rule) so that the
first audio follows the LLM's first few words; each later clause is spoken as a continuation
conditioned on the clauses before it, in the same Pipecat turn (one TTSStartedFrame /
TTSStoppedFrame pair, one timeline of word timestamps). `split="sentence"` speaks whole sentences.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import soxr
from loguru import logger

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseStartFrame,
    StartFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, TTSService
from pipecat.utils.text.base_text_aggregator import Aggregation, BaseTextAggregator, TextType
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

# all torch-free: importing the adapter loads no model code
from csm_plugin.audio import as_mono
from csm_plugin.conversation.clauses import SplitMode, TextSplitter
from csm_plugin.conversation.options import FIELDS as SPEAK_FIELDS, SpeakOptions
from csm_plugin.conversation.styles import StyleTagCarry
from csm_plugin.errors import InputError
from csm_plugin.voices import VoicePrompt

MODEL_RATE = 24_000  # CSM / Mimi output rate
FRAME_MS = 80  # one CSM frame
PRE_ROLL_S = 0.5  # user audio kept from before the VAD fired (VAD start is late by its start_secs)
TURN_MATCH_S = 2.0  # a user turn's timestamp and the start of its captured audio, at most this apart

# Wall clock for the playout estimate; a module attribute so tests can drive it.
_clock = time.monotonic


@dataclass
class CSMTTSSettings(TTSSettings):
    """Settings of CSMTTSService (runtime-updatable through `TTSUpdateSettingsFrame`).

    Parameters:
        model: checkpoint path or hub id; None = $CSM_MODEL, else sesame/csm-1b (load time only).
        voice: name of a voice prompt registered with the backend (`add_voice`, or a server's
            voices file), pinned as the agent's speaker at the start of the conversation (new
            conversations only). To give the clip itself, use the constructor's `voice_prompt`.
        speaker: the agent's CSM speaker id.
        user_speaker: the user's CSM speaker id.
        temperature, top_k: sampling.
        seed: base seed; the n-th piece this service speaks (from 0) uses seed + n (each clause or
            sentence is a reply of its own). None = random.
        max_audio_ms: cap on each piece's audio (None: the model's limit for the text).
        context_budget: positions a conversation's context may use (an engine option, load time
            only; None = the model's 2048).
        max_user_audio_s: user turns with more audio than this are recorded as text only.
        split: how LLM text is cut into the pieces spoken one after another: "clause" (first
            audio at the first clause boundary; csm_plugin's clause rule) or "sentence" (Pipecat's
            own sentence aggregator). Applies from the next LLM response.
        clause_min_words, clause_max_words: clause mode: a clause ends at , ; : or a sentence end
            once it has clause_min_words words, and at the latest after clause_max_words words.
        style: a style registered with the backend (`SpeakOptions.style`), for every reply; None:
            no style. A reply's leading `[style]` tag is carried to each of its pieces.
    """

    speaker: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    user_speaker: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    temperature: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    top_k: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    seed: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_audio_ms: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    context_budget: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_user_audio_s: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    split: SplitMode | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    clause_min_words: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    clause_max_words: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    style: str | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


_RELOAD_FIELDS = {"model", "context_budget"}  # need a new engine
_NEW_CONVERSATION_FIELDS = {"voice"}  # pinned when the conversation is created
_SPLIT_FIELDS = {"split", "clause_min_words", "clause_max_words"}  # the text aggregator


class ClauseTextAggregator(BaseTextAggregator):
    """A Pipecat text aggregator that cuts LLM text at clause boundaries, with csm_plugin's one
    clause rule (`csm_plugin.conversation.clauses.TextSplitter`): a clause ends at , ; : or a
    sentence end followed by whitespace once it has `min_words` words, or after `max_words` words
    without punctuation.

    The pieces are typed as sentences (`TextType.SENTENCE`), so `text_transforms` and
    `skip_text_types` written for Pipecat's sentence aggregation apply to them unchanged.
    """

    def __init__(self, *, min_words: int = 2, max_words: int = 12, language: str | None = None):
        super().__init__(aggregation_type=TextType.SENTENCE, language=language)
        self._splitter = TextSplitter("clause", min_words=min_words, max_words=max_words)
        self.min_words, self.max_words = min_words, max_words

    @property
    def text(self) -> Aggregation:
        return Aggregation(text=self._splitter.pending, type=TextType.SENTENCE)

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        for piece in self._splitter.push(text):
            yield Aggregation(text=piece, type=TextType.SENTENCE)

    async def flush(self) -> Aggregation | None:
        rest = self._splitter.flush()
        return Aggregation(text=rest, type=TextType.SENTENCE) if rest else None

    async def handle_interruption(self):
        await self.reset()

    async def reset(self):
        self._splitter.flush()


@dataclass
class _Utterance:
    """One run_tts call: where its audio sits in its turn's audio, and how much it produced."""

    offset_ms: float
    ms: float = 0.0
    trimmed: bool = False


@dataclass
class _Playout:
    """Audio of one turn (TTS context) as the output transport plays it, in real time: each
    pushed chunk starts when the previous one ends, or when it is pushed if the transport ran dry.
    Without a transport (no BotStartedSpeakingFrame ever seen), all pushed audio counts as played."""

    interruptible: bool = True
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (start s, duration ms)
    end: float = 0.0
    pushed_ms: float = 0.0
    drained_ms: float = 0.0  # played for sure: the transport reported it had finished speaking
    utterances: list[_Utterance] = field(default_factory=list)

    def push(self, now: float, ms: float) -> None:
        start = max(now, self.end)
        self.chunks.append((start, ms))
        self.end = start + ms / 1000
        self.pushed_ms += ms

    def played_ms(self, now: float, paced: bool) -> float:
        if not paced:
            return self.pushed_ms
        return max(self.drained_ms, sum(min(ms, max(0.0, (now - start) * 1000)) for start, ms in self.chunks))


class CSMTTSService(TTSService):
    """Pipecat TTS service backed by csm-plugin (Sesame CSM-1B), context-aware and streaming.

    Engine placement: by default the process-wide in-process service
    (`csm_plugin.backend.shared_service`, loaded once and shared by every pipeline of the
    process); `url=` uses a csm-plugin server through `csm_plugin.client.RemoteBackend`;
    `backend=` takes any started-or-not `SpeechBackend` (for example a `CSMService`).
    """

    Settings = CSMTTSSettings
    _settings: Settings

    def __init__(
        self,
        *,
        url: str | None = None,
        api_key: str | None = None,
        backend: Any | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        engine_options: Mapping[str, Any] | None = None,
        conversation_id: str | None = None,
        split: SplitMode = "clause",
        clause_min_words: int = 2,
        clause_max_words: int = 12,
        style: str | None = None,
        voice_prompt: VoicePrompt | tuple[str, Any, int] | None = None,
        settings: Settings | None = None,
        **kwargs,
    ):
        """Args:
        url: a csm-plugin server (`ws://host:port/...`) instead of the in-process engine.
        api_key: the server's API key, with `url`.
        backend: an explicit SpeechBackend (overrides url and the shared engine).
        device, dtype: where the in-process engine runs ("cuda", "bfloat16"...).
        engine_options: other `CSMService` options (max_cached_conversations, ...).
        conversation_id: id of this pipeline's conversation (default: a fresh uuid).
        split, clause_min_words, clause_max_words, style: the settings of the same names (see
            `CSMTTSService.Settings`); a value in `settings` wins.
        voice_prompt: the agent's voice as a `VoicePrompt(text, audio, sample_rate)` (or that
            tuple), registered on the backend under a content-derived name; instead of the `voice`
            setting, which names a voice registered elsewhere (e.g. a server's voices file).
        settings: see `CSMTTSService.Settings`.
        **kwargs: `TTSService` options (sample_rate, text_transforms, ...).

        Raises InputError (a ValueError) for invalid settings, for token-by-token text
        aggregation (CSM speaks whole pieces: use `split`), and for `voice` with `voice_prompt`.
        """
        store = self.Settings(
            model=None,
            voice=None,
            language=None,
            speaker=0,
            user_speaker=1,
            temperature=0.9,
            top_k=50,
            seed=None,
            max_audio_ms=None,
            context_budget=None,
            max_user_audio_s=20.0,
            split=split,
            clause_min_words=clause_min_words,
            clause_max_words=clause_max_words,
            style=style,
        )
        if settings is not None:
            store.apply_update(settings)
        # Each run_tts call is one reply of the conversation, conditioned on the ones before: a
        # token per call would make every token a reply. Pieces come from the aggregator below.
        if kwargs.get("text_aggregation_mode") == TextAggregationMode.TOKEN or kwargs.get("aggregate_sentences") is False:
            raise InputError('CSMTTSService speaks whole pieces of text, not tokens: choose split="clause" or "sentence"')
        # The pieces of one LLM response are continuations of one turn: they must share the turn's
        # context (one Started/Stopped pair, one timeline) for barge-in trimming and style tags.
        if kwargs.get("reuse_context_id_within_turn") is False:
            raise InputError("CSMTTSService needs reuse_context_id_within_turn=True (the pieces of a reply form one turn)")
        self._voice_prompt = None if voice_prompt is None else VoicePrompt.of(voice_prompt)
        if self._voice_prompt is not None and store.voice:
            raise InputError("give the agent's voice either as voice= (a registered name) or as voice_prompt=, not both")
        self._check_settings(store)
        kwargs.setdefault("stop_frame_timeout_s", 10.0)  # a CPU prefill can take seconds
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,  # words come with timestamps instead
            settings=store,
            **kwargs,
        )
        self._split_config: tuple | None = None
        self._configure_aggregator()
        # The style tag of each LLM response, carried to all of its pieces. Keyed by the turn's
        # context id: a TTSSpeakFrame spoken in the middle of a response has its own.
        self._style_carries: dict[str, StyleTagCarry] = {}
        self._url, self._api_key, self._backend = url, api_key, backend
        self._owns_backend = backend is None and url is not None
        self._device, self._dtype = device, dtype
        self._engine_options = dict(engine_options or {})
        self._conversation_id = conversation_id or f"pipecat-{uuid.uuid4().hex}"
        self._conversation = None
        self._closed = False
        self._open_task: asyncio.Task | None = None
        self._user_turn_task: asyncio.Task | None = None
        self._replies = 0
        self._speech = None  # the reply generator being consumed, if any
        self._playouts: dict[str, _Playout] = {}
        self._paced = False
        # User audio of the current turn.
        self._user_speaking = False
        self._user_started_at = 0.0
        self._user_rate = 0
        self._user_audio: list[bytes] = []
        self._pre_roll: deque[bytes] = deque()
        # Audio of finished user turns, oldest first: (wall-clock start, 16-bit PCM, rate). Each
        # LLMContextUserTurnFrame takes its own, which may come after the next turn's audio.
        self._captured: deque[tuple[float, bytes, int]] = deque()

    # --- public ---------------------------------------------------------------------------

    @property
    def conversation(self):
        """This pipeline's conversation (a csm-plugin ConversationHandle), None until opened. Its
        cache is released when the pipeline ends; its history stays readable."""
        return self._conversation

    async def wait_ready(self):
        """Wait until the engine is loaded and the conversation open; returns the conversation,
        or None if loading failed (that failure was logged and pushed as an ErrorFrame)."""
        if self._open_task is None:
            self._open_task = asyncio.ensure_future(self._open())
        task = self._open_task
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # the pipeline ended while loading: nothing to wait for
                return None
            raise

    @property
    def voice_prompt(self) -> VoicePrompt | None:
        """The voice prompt given to the constructor (its registered name: `voice_prompt.name`)."""
        return self._voice_prompt

    def can_generate_metrics(self) -> bool:
        return True

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, frame: StartFrame):
        await super().start(frame)
        # Load in the background: the pipeline starts at once, the first reply waits for it.
        if self._open_task is None:
            self._open_task = self.create_task(self._open(), name="csm-open")

    async def _open(self):
        try:
            backend = self._backend
            if backend is None and self._url is not None:
                from csm_plugin.client import RemoteBackend  # noqa: PLC0415 - optional, remote mode only

                backend = RemoteBackend(self._url, api_key=self._api_key)
            if backend is None:
                from csm_plugin.backend import shared_service  # noqa: PLC0415

                options = dict(self._engine_options)
                if self._settings.context_budget is not None:
                    options["context_budget"] = self._settings.context_budget
                backend = await shared_service(self._settings.model, device=self._device, dtype=self._dtype, **options)
            else:
                backend = await backend.start() or backend
            self._backend = backend
            self._conversation = await self._open_conversation(backend)
            logger.info(f"{self}: conversation {self._conversation_id} ready")
            return self._conversation
        except _VoicePromptError as e:
            logger.error(f"{self}: could not register the voice prompt: {e}")
            self._stop_frame_timeout_s = 0.05  # as below: no turn waits for audio that cannot come
            await self.push_error(f"CSM TTS could not register its voice prompt: {e}", exception=e.__cause__, force_treat_as_permanent=True)
            return None
        except Exception as e:
            where = self._url or self._settings.model or "the default CSM model"
            logger.error(f"{self}: could not load CSM ({where}): {type(e).__name__}: {e}")
            # Permanent: the service stops taking text, so no turn waits on a model that is not there;
            # nor on the audio it would have made (Pipecat waits stop_frame_timeout_s for it, which
            # is long here because a CPU prefill can take seconds).
            self._stop_frame_timeout_s = 0.05
            await self.push_error(f"CSM TTS could not load {where}: {e}", exception=e, force_treat_as_permanent=True)
            return None

    async def _open_conversation(self, backend: Any):
        speaker, prompt = self._settings.speaker, self._voice_prompt
        if prompt is None:
            voices = {speaker: self._settings.voice} if self._settings.voice else None
            return backend.conversation(self._conversation_id, voices=voices)
        if hasattr(backend, "add_voice"):
            try:
                name = await prompt.register(backend)
            except Exception as e:
                raise _VoicePromptError(f"{type(e).__name__}: {e}") from e
            return backend.conversation(self._conversation_id, voices={speaker: name})  # pinned: never trimmed
        # A backend that takes no voices from clients (a csm-plugin server only has the voices of
        # its voices file): the prompt becomes the conversation's first turn. It conditions the
        # replies the same way, but is not pinned: it leaves the context once newer turns fill it.
        logger.info(f"{self}: {type(backend).__name__} registers no voices; the voice prompt is the conversation's first turn")
        conv = backend.conversation(self._conversation_id)
        if not conv.history:
            try:
                await conv.add_segment(speaker, prompt.text, audio=as_mono(prompt.audio), sample_rate=prompt.sample_rate)
            except Exception as e:
                raise _VoicePromptError(f"{type(e).__name__}: {e}") from e
        return conv

    async def stop(self, frame):
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame):
        await super().cancel(frame)
        await self._close()

    async def _close(self) -> None:
        conv, self._closed = (None if self._closed else self._conversation), True  # first: run_tts checks it
        await self._stop_speech()
        if self._open_task is not None and not self._open_task.done():
            await self.cancel_task(self._open_task)
        try:
            if conv is not None:
                await conv.close()
            if self._owns_backend and self._backend is not None:
                await self._backend.close()
        except Exception as e:  # noqa: BLE001 - teardown must not fail the pipeline
            logger.warning(f"{self}: closing the conversation failed: {e}")

    # --- settings -------------------------------------------------------------------------

    @staticmethod
    def _check_settings(s: Settings) -> None:
        """InputError unless the splitting and speaking settings make a valid splitter and
        SpeakOptions (checked when they are set, not at the next reply)."""
        TextSplitter(s.split, min_words=s.clause_min_words, max_words=s.clause_max_words)
        CSMTTSService._speak_options(s, s.seed)

    @staticmethod
    def _speak_options(s: Settings, seed: int | None) -> SpeakOptions:
        return SpeakOptions.build(None, **{name: getattr(s, name) for name in SPEAK_FIELDS - {"seed"} if hasattr(s, name)}, seed=seed)

    def _configure_aggregator(self) -> None:
        """Use the text aggregator the split settings ask for. A new one replaces the current one
        only while it holds no text, so that no LLM text is lost: else at the next LLM response."""
        s = self._settings
        config = (s.split, s.clause_min_words, s.clause_max_words)
        if config == self._split_config or (self._split_config is not None and self._text_aggregator.text.text):
            return
        language = self._text_aggregator.language
        if s.split == "clause":
            self._text_aggregator = ClauseTextAggregator(min_words=s.clause_min_words, max_words=s.clause_max_words, language=language)
        else:  # Pipecat's own sentence aggregator (abbreviation- and language-aware), as before clauses
            self._text_aggregator = SimpleTextAggregator(aggregation_type=TextType.SENTENCE, language=language)
        self._split_config = config

    async def _update_settings(self, delta: Settings) -> dict[str, Any]:
        changed = await super()._update_settings(delta)
        try:
            self._check_settings(self._settings)
        except InputError as e:  # keep the settings that worked; say why the update was refused
            for name, previous in changed.items():
                setattr(self._settings, name, previous)
            await self.push_error(f"CSM TTS settings update refused: {e}", exception=e)
            return {}
        self._warn_unhandled_updated_settings(set(changed) & (_RELOAD_FIELDS | _NEW_CONVERSATION_FIELDS))
        if set(changed) & _SPLIT_FIELDS:
            self._configure_aggregator()
        return changed  # sampling, speakers, style and limits apply from the next piece on

    # --- observing the conversation -------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InputAudioRawFrame):
            self._on_user_audio(frame)
        elif isinstance(frame, UserStartedSpeakingFrame):
            if not self._user_speaking:
                self._user_speaking = True
                self._user_started_at = time.time() - PRE_ROLL_S
                self._user_audio = list(self._pre_roll)
                self._pre_roll.clear()
        elif isinstance(frame, UserStoppedSpeakingFrame):
            if self._user_speaking and self._user_audio:
                self._captured.append((self._user_started_at, b"".join(self._user_audio), self._user_rate))
            self._user_speaking, self._user_audio = False, []
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._paced = True  # an output transport plays our audio in real time
        elif isinstance(frame, BotStoppedSpeakingFrame):
            for playout in self._playouts.values():
                playout.drained_ms = playout.pushed_ms
        elif isinstance(frame, LLMFullResponseStartFrame) and not frame.skip_tts:
            self._configure_aggregator()  # a split setting changed during the last response

        await super().process_frame(frame, direction)

        if isinstance(frame, InterruptionFrame):
            await self._on_interruption()
        elif isinstance(frame, LLMContextUserTurnFrame) and direction == FrameDirection.DOWNSTREAM:
            self._queue_user_turn(frame.text, frame.timestamp)

    def _on_user_audio(self, frame: InputAudioRawFrame) -> None:
        if frame.num_channels != 1 or not frame.audio:
            return
        if frame.sample_rate != self._user_rate:  # a new input format starts a new buffer
            self._user_rate, self._user_audio = frame.sample_rate, []
            self._pre_roll.clear()
            self._captured.clear()
        if self._user_speaking:
            self._user_audio.append(frame.audio)
        else:
            self._pre_roll.append(frame.audio)
            while sum(map(len, self._pre_roll)) > PRE_ROLL_S * self._user_rate * 2:
                self._pre_roll.popleft()

    def _take_turn_audio(self, timestamp: str) -> tuple[bytes, int]:
        """The captured audio of the user turn that started at `timestamp` (ISO 8601): the oldest
        captured turn, skipping turns whose transcript never came (they started well before)."""
        try:
            started = datetime.fromisoformat(timestamp).timestamp()
        except (TypeError, ValueError):
            started = None  # not a time (hand-made frames): turns and audio pair up in order
        while self._captured:
            at, pcm, rate = self._captured[0]
            if started is not None and at < started - TURN_MATCH_S:
                self._captured.popleft()  # audio whose transcript the aggregator left out
                continue
            if started is not None and at > started + TURN_MATCH_S:
                break  # the next turn's audio: this turn (typed, say) has none
            self._captured.popleft()
            return pcm, rate
        return b"", self._user_rate

    def _queue_user_turn(self, text: str, timestamp: str = "") -> None:
        """Record the user's turn (with its audio) in order, without holding up the frames."""
        data, rate = self._take_turn_audio(timestamp)
        pcm = np.frombuffer(data, dtype=np.int16)
        if not text.strip():
            return
        if len(pcm) > self._settings.max_user_audio_s * rate:
            logger.debug(f"{self}: user turn has {len(pcm) / rate:.1f} s of audio; recording its text only")
            pcm = pcm[:0]
        audio = pcm if len(pcm) >= rate * FRAME_MS // 1000 and rate else None
        previous = self._user_turn_task

        async def add() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                conv = await self.wait_ready()
                await conv.add_segment(self._settings.user_speaker, text, audio=audio, sample_rate=rate if audio is not None else None)
            except Exception as e:  # noqa: BLE001 - a lost user turn must not stop the pipeline
                logger.warning(f"{self}: could not add the user turn to the conversation: {e}")

        self._user_turn_task = self.create_task(add(), name="csm-user-turn")

    # --- speaking -------------------------------------------------------------------------

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Speak one piece of a turn (a clause, a sentence, or a TTSSpeakFrame's text) as a reply
        of the conversation: conditioned on everything before it, the turn's earlier pieces
        included, its audio continuing the turn's audio and word timeline."""
        # The piece carries its response's style tag whether or not it is spoken, so that the
        # next piece still knows the response's first one.
        text = self._style_carries.setdefault(context_id, StyleTagCarry())(text)
        conv = None if self._closed else await self.wait_ready()
        if conv is None or self._closed:
            # Nothing will be spoken: the pipeline is ending (the conversation is closed and is
            # not reopened), or the model failed to load (reported once). The turn's audio
            # context is closed when its text ends (on_turn_context_completed), at once.
            return
        if self._user_turn_task is not None:
            await asyncio.shield(self._user_turn_task)  # the user's turn is in the context first
        s = self._settings
        seed = None if s.seed is None else s.seed + self._replies
        self._replies += 1
        playout = self._playouts.setdefault(context_id, _Playout())
        utterance = _Utterance(offset_ms=sum(u.ms for u in playout.utterances))
        playout.utterances.append(utterance)
        out_rate = self.sample_rate
        resampler = None if out_rate == MODEL_RATE else soxr.ResampleStream(MODEL_RATE, out_rate, 1, dtype="int16", quality="HQ")
        speech = None
        try:
            await self.start_tts_usage_metrics(text)
            speech = self._speech = conv.speak(text, self._speak_options(s, seed))
            async for chunk in speech:
                await self.stop_ttfb_metrics()
                utterance.ms = chunk.start_ms + chunk.duration_ms
                # each word starts within the audio produced (the service places them so)
                words = [(w.text, (utterance.offset_ms + w.start_ms) / 1000) for w in chunk.words]
                if words:
                    await self.add_word_timestamps(words, context_id)
                pcm = chunk.pcm if resampler is None else resampler.resample_chunk(chunk.pcm)
                if len(pcm):
                    yield TTSAudioRawFrame(pcm.tobytes(), out_rate, 1, context_id=context_id)
            if resampler is not None:
                tail = resampler.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
                if len(tail):
                    yield TTSAudioRawFrame(tail.tobytes(), out_rate, 1, context_id=context_id)
        except Exception as e:  # noqa: BLE001 - as the official services: every failure is an ErrorFrame
            logger.error(f"{self}: CSM could not speak {text!r}: {type(e).__name__}: {e}")
            yield ErrorFrame(error=f"CSM TTS error: {e}")
        finally:
            await self.stop_ttfb_metrics()
            if speech is not None:
                if self._speech is speech:
                    self._speech = None
                await speech.aclose()

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        await super().push_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and frame.context_id and direction == FrameDirection.DOWNSTREAM:
            playout = self._playouts.setdefault(frame.context_id, _Playout())
            playout.interruptible = frame.interruptible
            playout.push(_clock(), 1000 * frame.num_frames / frame.sample_rate)

    # --- barge-in -------------------------------------------------------------------------

    async def _stop_speech(self) -> None:
        """Close a reply left open at a yield (cancellation closes one waiting for a frame)."""
        speech, self._speech = self._speech, None
        if speech is not None:
            try:
                await speech.aclose()
            except RuntimeError as e:  # still running in a task being torn down
                logger.debug(f"{self}: reply generator close: {e}")

    async def _on_interruption(self) -> None:
        """The base class has cancelled run_tts and dropped queued audio. Make the conversation
        keep what the listener heard: replies newest first, each trimmed to its played part."""
        await self._stop_speech()
        # the interrupted responses are over (uninterruptible speech goes on, with its tag)
        self._style_carries = {cid: c for cid, c in self._style_carries.items() if self.audio_context_available(cid)}
        conv = self._conversation
        now = _clock()
        for context_id, playout in list(self._playouts.items()):
            if conv is None or not playout.interruptible:
                continue
            # Its utterances are the last history segments, played back to back: the history
            # trims them newest first, each to what started playing.
            spoken = [u for u in playout.utterances if u.ms > 0 and not u.trimmed]
            if spoken and not conv.speaking:  # a new (uninterruptible) reply began: leave the history alone
                played = playout.played_ms(now, self._paced)
                await conv.interrupt(max(0.0, played - spoken[0].offset_ms), replies=len(spoken))
                for u in spoken:
                    u.trimmed = True
            del self._playouts[context_id]

    async def on_turn_context_completed(self):
        # run_tts yields all of its audio itself (none arrives later from elsewhere), so the turn's
        # audio context can be closed as soon as its text has been spoken. The base class decides
        # that from the last run_tts call alone: a turn whose last piece produced no audio (a CSM
        # error, a closed conversation) would hold its context, and every turn after it, until
        # stop_frame_timeout_s (10 s) ran out.
        self._is_yielding_frames_synchronously = True
        self._style_carries.pop(self._turn_context_id, None)  # the response is over
        await super().on_turn_context_completed()

    async def on_audio_context_completed(self, context_id: str):
        await super().on_audio_context_completed(context_id)
        # Keep the playout until it has played, so a late barge-in still trims this turn.
        for cid, playout in list(self._playouts.items()):
            if cid != context_id and playout.end < _clock():
                del self._playouts[cid]


class _VoicePromptError(Exception):
    """The voice prompt could not be registered or added (its cause is the backend's error)."""
