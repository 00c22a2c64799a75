"""Where streamed LLM text is cut into the pieces that are spoken one after another.

The one rule both adapters use: speaking starts at the first clause boundary, not at the end of
the sentence, so the first audio follows the LLM's first few words. Each later piece is spoken as
a continuation conditioned on the pieces before it (a separate agent turn), its prefill overlapping
the audio already playing.

- "clause" mode (the default) ends a piece at , ; : or a sentence end (. ! ? and their kin), each
  followed by whitespace, once the piece has `min_words` words; or at the whitespace after
  `max_words` words when no punctuation comes.
- "sentence" mode ends a piece at sentence ends only (whole-sentence mode, as before).

A leading "[style]" tag (conversation/styles.py) is not counted as a word.

Punctuation followed by a non-space ("1,000", "3.5", "e.g.x") is never a boundary, so a boundary
is only known once the character after it has arrived.
"""

from __future__ import annotations

import re
from typing import Literal

from ..errors import InputError
from .styles import split_style_tag

SplitMode = Literal["clause", "sentence"]

_CLAUSE_END = re.compile(r"[,;:\u2014.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s)")
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s)")
_WORD = re.compile(r"\S+")


class TextSplitter:
    """Cuts text pushed piece by piece (LLM tokens) into the pieces to speak.

        splitter = TextSplitter()            # or TextSplitter("sentence")
        for piece in splitter.push(token):   # zero or more complete pieces
            speak(piece)
        if (rest := splitter.flush()):        # the end of the LLM's text
            speak(rest)
    """

    def __init__(self, mode: SplitMode = "clause", *, min_words: int = 2, max_words: int = 12):
        if mode not in ("clause", "sentence"):
            raise InputError(f"split mode must be 'clause' or 'sentence', got {mode!r}")
        for name, value in (("min_words", min_words), ("max_words", max_words)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an int >= 1, got {value!r}")
        if max_words < min_words:
            raise InputError(f"max_words ({max_words}) must be at least min_words ({min_words})")
        self.mode, self.min_words, self.max_words = mode, min_words, max_words
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        """Add text; return the pieces it completes (stripped, never empty)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        self._buffer += text
        pieces = []
        while (end := self._boundary()) is not None:
            piece, self._buffer = self._buffer[:end].strip(), self._buffer[end:].lstrip()
            if piece:
                pieces.append(piece)
        return pieces

    @property
    def pending(self) -> str:
        """The text pushed and not given out as a piece yet (stripped)."""
        return self._buffer.strip()

    def flush(self) -> str | None:
        """The text not spoken yet (the LLM's text ended); None if there is none."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None

    def _boundary(self) -> int | None:
        """End of the first complete piece in the buffer, or None."""
        pattern = _CLAUSE_END if self.mode == "clause" else _SENTENCE_END
        # A leading "[style]" tag is not a word: "[calm] Sure," is one word, like "Sure,".
        tag_end = len(self._buffer) - len(split_style_tag(self._buffer)[1])
        for match in pattern.finditer(self._buffer, tag_end):
            if self.mode == "sentence":
                return match.end()
            words = len(_WORD.findall(self._buffer, tag_end, match.end()))
            if words > self.max_words:
                break  # the word limit comes first
            if words >= self.min_words:
                return match.end()
        if self.mode == "clause":
            words = list(_WORD.finditer(self._buffer, tag_end))
            # max_words complete words: the word after them has started (or whitespace follows)
            if len(words) > self.max_words:
                return words[self.max_words - 1].end()
            if len(words) == self.max_words and self._buffer[words[-1].end():][:1].isspace():
                return words[-1].end()
        return None


def split_text(text: str, mode: SplitMode = "clause", *, min_words: int = 2, max_words: int = 12) -> list[str]:
    """A whole text cut the way TextSplitter cuts it when streamed."""
    splitter = TextSplitter(mode, min_words=min_words, max_words=max_words)
    pieces = splitter.push(text)
    rest = splitter.flush()
    return pieces + ([rest] if rest else [])
