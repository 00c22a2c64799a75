"""Text tokenizer and prompt building: segments -> backbone rows of 33 columns.

Column k < 32 holds codebook k of one Mimi frame; column 32 holds one text token. A segment is its
text rows (`<|begin_of_text|>[speaker]text<|end_of_text|>`, one token per row), then, when it has
audio, one row per frame followed by an all-zero end-of-audio frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from .conversation.types import NUM_CODEBOOKS, Segment, check_speaker, check_text
from .errors import CheckpointError

NUM_COLUMNS = NUM_CODEBOOKS + 1
__all__ = ["NUM_CODEBOOKS", "NUM_COLUMNS", "Segment", "TextTokenizer", "check_speaker", "check_text",
           "text_rows", "audio_rows", "segment_rows", "build_prompt"]


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


def audio_rows(codes: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [frames, 32] -> rows for those frames plus the all-zero end-of-audio frame."""
    frames = codes.shape[0] + 1
    tokens = torch.zeros(frames, NUM_COLUMNS, dtype=torch.long)
    mask = torch.zeros(frames, NUM_COLUMNS, dtype=torch.bool)
    tokens[:-1, :-1] = torch.as_tensor(np.asarray(codes, dtype=np.int64)) if isinstance(codes, np.ndarray) else codes.to(torch.long).cpu()
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
