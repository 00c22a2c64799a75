"""Option types of the CSM plugin (kept free of heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TTSModels = Literal["sesame/csm-1b"]
"""Hub ids known to work; a local checkpoint directory works too."""

DTypes = Literal["float32", "bfloat16"]

SAMPLE_RATE = 24000  # CSM / Mimi output rate
NUM_CHANNELS = 1


@dataclass(frozen=True)
class VoicePrompt:
    """Reference speech for the agent's voice: a clip and its exact transcript. CSM continues in
    the voice of the context, so this pins who the agent sounds like for the whole conversation."""

    text: str
    audio: Any  # mono samples (numpy array, float in [-1, 1] or int16)
    sample_rate: int
