"""Style tags: an LLM selects the style of a reply with a leading tag, "[comforting] I'm so sorry."

The tag is never spoken. The service parses it (`split_style_tag`) and applies its policy for
names it does not know (`UnknownTags`: speak the tag as text, or drop it; never an error mid-call).
Adapters that cut one LLM reply into several pieces (clauses, sentences) use `StyleTagCarry`, so
that every piece of the reply carries the tag its first piece had.
"""

from __future__ import annotations

import re
from typing import Literal

from ..errors import InputError
from .types import NAME_PATTERN

UnknownTags = Literal["drop", "speak"]
UNKNOWN_TAGS: tuple[str, ...] = ("drop", "speak")

_TAG = re.compile(rf"\s*\[({NAME_PATTERN})\]\s*")


def check_unknown_tags(value: object) -> UnknownTags:
    if value not in UNKNOWN_TAGS:
        raise InputError(f"unknown_style_tags must be 'drop' or 'speak', got {value!r}")
    return value  # type: ignore[return-value]


def split_style_tag(text: str) -> tuple[str | None, str]:
    """("comforting", "I'm so sorry.") for "[comforting] I'm so sorry."; (None, text) without a tag."""
    match = _TAG.match(text)
    if match is None:
        return None, text
    return match.group(1), text[match.end():]


class StyleTagCarry:
    """Gives each piece of one reply the tag of its first piece: "[calm] One," then "two." ->
    "[calm] One," and "[calm] two.". reset() at the start of the next reply."""

    def __init__(self) -> None:
        self._tag: str | None = None
        self._first = True

    def reset(self) -> None:
        self._tag, self._first = None, True

    def __call__(self, piece: str) -> str:
        if self._first:
            self._first = False
            self._tag, _ = split_style_tag(piece)
            return piece
        if self._tag is None or split_style_tag(piece)[0] is not None:
            return piece
        return f"[{self._tag}] {piece}"
