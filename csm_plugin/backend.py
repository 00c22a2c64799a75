"""What the framework adapters talk to: the in-process service or a remote server's client.

Both sides implement the same small surface, so an adapter never knows which one it has:

    backend = await shared_service(model, device=..., dtype=...)   # or: await RemoteBackend(url, api_key).start()
    conv = backend.conversation("call-42")
    await conv.add_segment(1, "user words", audio=pcm, sample_rate=16000)
    async for chunk in conv.speak("reply", speaker=0, seed=...):  # AudioChunk: int16 24 kHz
        ...
    await conv.interrupt(played_ms)                                   # barge-in (replies=n: the last n)
    await conv.close()
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from .models.loading import DEFAULT_MODEL
from .conversation.history import Event
from .conversation.options import SpeakOptions
from .conversation.types import AudioChunk, Segment, Turn
from .service import CSMService


@runtime_checkable
class ConversationHandle(Protocol):
    id: str

    @property
    def history(self) -> list[Segment]: ...

    @property
    def turns(self) -> list[Turn]: ...

    @property
    def speaking(self) -> bool: ...

    async def add_segment(
        self, speaker: int, text: str, audio: np.ndarray | None = None, sample_rate: int | None = None
    ) -> list[Event]: ...

    def speak(self, text: str, options: SpeakOptions | None = None, **changes) -> AsyncIterator[AudioChunk]: ...

    async def interrupt(self, played_ms: float | None = None, *, replies: int = 1) -> list[Event]: ...

    async def close(self) -> None: ...


@runtime_checkable
class SpeechBackend(Protocol):
    async def start(self) -> "SpeechBackend": ...

    def conversation(self, conversation_id: str, *, voices: Mapping[int, str] | None = None) -> ConversationHandle: ...

    async def close(self) -> None: ...


_shared: dict[tuple, CSMService] = {}
_shared_lock = threading.Lock()


async def shared_service(
    model: str | os.PathLike | None = None, *, device: str = "cpu", dtype: str = "float32", **options
) -> CSMService:
    """The process-wide service for these settings: the model loads once, however many pipelines
    or agent jobs (and event loops) the process runs. `model` defaults to $CSM_MODEL, else
    sesame/csm-1b. A failed load, or a service whose worker died, is not kept: the next call
    starts again."""
    model = str(model or os.environ.get("CSM_MODEL", DEFAULT_MODEL))
    key = (model, device, str(dtype), tuple(sorted(options.items())))
    with _shared_lock:
        service = _shared.get(key)
        if service is not None and service._worker is not None and service._worker.ready.done() and not service.alive:
            service = None  # its worker died: start a new one
        if service is None:
            service = _shared[key] = CSMService(model, device=device, dtype=dtype, **options)
    try:
        return await service.start()
    except BaseException:
        with _shared_lock:
            if _shared.get(key) is service:
                del _shared[key]
        raise
