"""LiveKit Agents plugin for Sesame CSM via csm-plugin: context-aware, streaming speech.

    from livekit.plugins import csm
    session = AgentSession(stt=..., llm=..., tts=csm.TTS(device="cuda", dtype="bfloat16"))

Importing this package is light: no torch, no weights, no threads. The model loads in
`TTS.prewarm()` or on first use, once per process; `csm.TTS(url=...)` uses a csm-plugin server.
"""

from livekit.agents import Plugin

from .log import logger
from .models import DTypes, TTSModels, VoicePrompt
from .tts import TTS, ChunkedStream, SynthesizeStream
from .version import __version__

__all__ = ["TTS", "ChunkedStream", "SynthesizeStream", "VoicePrompt", "TTSModels", "DTypes", "__version__"]


class CSMPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)

    def download_files(self) -> None:
        """`python -m livekit.agents download-files`: fetch the default checkpoint into the
        Hugging Face cache (or $CSM_MODEL if it names a hub id), so the first job starts fast."""
        import os

        from csm_plugin.models.loading import DEFAULT_MODEL, resolve_model_path

        resolve_model_path(os.environ.get("CSM_MODEL", DEFAULT_MODEL))


Plugin.register_plugin(CSMPlugin())
