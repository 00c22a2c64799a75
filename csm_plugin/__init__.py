"""csm-plugin: context-aware streaming speech (Sesame CSM-1B) for real-time voice agents.

The public names load lazily, so `import csm_plugin` stays cheap (no torch until one is used).
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "CSMService": "service",
    "Conversation": "service",
    "AudioChunk": "service",
    "Turn": "service",
    "Voice": "service",
    "Style": "service",
    "Exemplar": "service",
    "Word": "service",
    "shared_service": "backend",
    "SpeechBackend": "backend",
    "ConversationHandle": "backend",
    "RemoteBackend": "client",
    "Engine": "engine",
    "Sampling": "engine",
    "Segment": "conversation.types",
    "SpeakOptions": "conversation.options",
    "History": "conversation.history",
    "Reply": "service",
    "make_test_checkpoint": "models.loading",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'csm_plugin' has no attribute {name!r}")
