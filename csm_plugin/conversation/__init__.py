"""The conversation core, torch-free: shared types, the History (what the listener heard, written
once), the speak options and the wire protocol. The service, the server, the remote client and
the framework adapters all build on it; none of it loads the model."""

from .history import Dropped, Event, History, Recorded, Removed, Trimmed, heard_frames, spoken_text, word_timings
from .options import SpeakOptions
from .types import FRAME_MS, SAMPLE_RATE, AudioChunk, Origin, Segment, Turn, Word

__all__ = [
    "FRAME_MS", "SAMPLE_RATE", "AudioChunk", "Origin", "Segment", "Turn", "Word", "SpeakOptions", "History",
    "Event", "Recorded", "Trimmed", "Removed", "Dropped", "heard_frames", "spoken_text", "word_timings",
]
