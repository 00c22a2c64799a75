"""Text tokenizer and prompt building: segments -> backbone rows of 33 columns.

Column k < 32 holds codebook k of one Mimi frame; column 32 holds one text token. A segment is its
text rows (`<|begin_of_text|>[speaker]text<|end_of_text|>`, one token per row), then, when it has
audio, one row per frame followed by an all-zero end-of-audio frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .errors import CheckpointError, InputError

NUM_CODEBOOKS = 32
NUM_COLUMNS = NUM_CODEBOOKS + 1


def check_speaker(speaker: object) -> int:
    # bool is an int subclass; "[True]" would be a silently wrong prompt.
    if isinstance(speaker, bool) or not isinstance(speaker, int):
        raise InputError(f"speaker must be a non-negative int, got {type(speaker).__name__} {speaker!r}")
    if speaker < 0:
        raise InputError(f"speaker must be a non-negative int, got {speaker}")
    return speaker


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise InputError("text is empty")
    return text.strip()


@dataclass(frozen=True)
class Segment:
    """One turn of a conversation. `codes` is [frames, 32] Mimi codes, or None for text only."""

    speaker: int
    text: str
    codes: torch.Tensor | None = None

    def __post_init__(self):
        check_speaker(self.speaker)
        check_text(self.text)
        if self.codes is not None and (self.codes.ndim != 2 or self.codes.shape[1] != NUM_CODEBOOKS):
            raise InputError(f"segment codes must be [frames, {NUM_CODEBOOKS}], got {list(self.codes.shape)}")


class TextTokenizer:
    """The Llama-3 tokenizer; BOS and EOS are added here, whatever the file's post-processor says."""

    def __init__(self, tokenizer: Tokenizer, bos_token_id: int = 128_000, eos_token_id: int = 128_001):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @classmethod
    def from_file(cls, path: str | Path, **ids: int) -> "TextTokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)), **ids)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise CheckpointError(f"cannot read tokenizer file {path}: {e}") from e

    def encode_segment_text(self, speaker: int, text: str) -> list[int]:
        ids = self.tokenizer.encode(f"[{check_speaker(speaker)}]{check_text(text)}", add_special_tokens=False).ids
        return [self.bos_token_id, *ids, self.eos_token_id]


def text_rows(token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(token_ids), NUM_COLUMNS, dtype=torch.long)
    mask = torch.zeros(len(token_ids), NUM_COLUMNS, dtype=torch.bool)
    tokens[:, -1] = torch.tensor(token_ids, dtype=torch.long)
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [frames, 32] -> rows for those frames plus the all-zero end-of-audio frame."""
    frames = codes.shape[0] + 1
    tokens = torch.zeros(frames, NUM_COLUMNS, dtype=torch.long)
    mask = torch.zeros(frames, NUM_COLUMNS, dtype=torch.bool)
    tokens[:-1, :-1] = codes.to(torch.long).cpu()
    mask[:, :-1] = True
    return tokens, mask


def segment_rows(tokenizer: TextTokenizer, segment: Segment) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask = text_rows(tokenizer.encode_segment_text(segment.speaker, segment.text))
    if segment.codes is None:
        return tokens, mask
    a_tokens, a_mask = audio_rows(segment.codes)
    return torch.cat([tokens, a_tokens]), torch.cat([mask, a_mask])


def build_prompt(
    tokenizer: TextTokenizer, context: list[Segment], speaker: int, text: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the whole context followed by the text rows of the utterance to generate: [N, 33] x 2."""
    parts = [segment_rows(tokenizer, s) for s in context]
    parts.append(text_rows(tokenizer.encode_segment_text(speaker, text)))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
