"""Option types of the CSM plugin (kept free of heavy imports)."""

from __future__ import annotations

from typing import Literal

from csm_plugin.voices import VoicePrompt  # noqa: F401 - the one voice-prompt type, shared with the Pipecat adapter

TTSModels = Literal["sesame/csm-1b"]
"""Hub ids known to work; a local checkpoint directory works too."""

DTypes = Literal["float32", "bfloat16"]

SAMPLE_RATE = 24000  # CSM / Mimi output rate
NUM_CHANNELS = 1


