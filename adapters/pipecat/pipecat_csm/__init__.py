"""Pipecat adapter for csm-plugin: `CSMTTSService`, a context-aware streaming TTS (Sesame CSM-1B).

    pip install "csm-plugin[pipecat]"

    from pipecat_csm import CSMTTSService
    tts = CSMTTSService(settings=CSMTTSService.Settings(temperature=0.8))
"""

from .tts import ClauseTextAggregator, CSMTTSService, CSMTTSSettings, VoicePrompt

__all__ = ["CSMTTSService", "CSMTTSSettings", "ClauseTextAggregator", "VoicePrompt"]
