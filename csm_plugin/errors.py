"""Typed errors. Every failure a user can cause or meet has its own class under `CSMError`."""


class CSMError(Exception):
    """Base class of every error csm-plugin raises on purpose."""


class CheckpointError(CSMError, ValueError):
    """A checkpoint is missing, cannot be downloaded, or does not match the expected format."""


class AudioError(CSMError, ValueError):
    """Audio input that cannot be used: empty, multi-channel, unreadable, or at an unusable rate."""


class InputError(CSMError, ValueError):
    """Bad text, speaker or sampling arguments."""


class UnknownStyleError(InputError):
    """A reply names a style that is not registered (`add_style`, or the server's voices file)."""


class ContextTooLongError(CSMError, ValueError):
    """The prompt does not fit in the model's position budget."""


class EngineError(CSMError, RuntimeError):
    """Generation failed inside the inference worker, or the worker is not running."""


class WorkerCrashedError(EngineError):
    """The inference worker thread died or was stopped; the service must be restarted."""


class ConversationBusyError(CSMError, RuntimeError):
    """A conversation already has a reply in progress (one `speak` at a time per conversation)."""
