"""Shared context prefixes: the cache rows of pinned voice prompts, computed once per service.

Many conversations start with the same voice prompt (reference audio + transcript, often 10 s or
more: a few hundred backbone rows). Like inference servers that share prompt prefixes, the engine
keeps a copy of those rows the first time a conversation prefills them, and a new conversation
that starts with the same prompts copies the rows into its slot instead of running the backbone
over them again. The store holds copies, never views of a slot, so evicting, trimming or
overwriting any slot can never change a stored prefix.

A context's shareable prefix is its leading run of `SharedKey`-keyed segments; a SharedKey must
name content that never changes (the service keys a pinned voice by the registered voice object
and the speaker it is pinned for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedKey:
    """The key of a segment whose rows may be shared between conversations (equal keys: equal
    content, hence equal rows at the start of a context)."""

    id: Hashable


@dataclass(frozen=True)
class StoredPrefix:
    keys: tuple[Hashable, ...]
    rows: tuple[int, ...]  # rows of each segment, in order
    k: torch.Tensor  # [layers, kv_heads, sum(rows), head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def shared_prefix(keys: Sequence[Hashable]) -> tuple[Hashable, ...]:
    """The leading run of SharedKeys in `keys`."""
    n = 0
    while n < len(keys) and isinstance(keys[n], SharedKey):
        n += 1
    return tuple(keys[:n])


class PrefixStore:
    """Stored prefixes by their keys, least recently used dropped first beyond `max_bytes`."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._prefixes: OrderedDict[tuple[Hashable, ...], StoredPrefix] = OrderedDict()
        self.hits = 0  # prefixes copied instead of prefilled (the bench reports them)

    def __len__(self) -> int:
        return len(self._prefixes)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._prefixes.values())

    def __contains__(self, keys: tuple[Hashable, ...]) -> bool:
        return keys in self._prefixes

    def get(self, keys: tuple[Hashable, ...]) -> StoredPrefix | None:
        prefix = self._prefixes.get(keys)
        if prefix is None:
            return None
        self.hits += 1
        self._prefixes.move_to_end(keys)
        return prefix

    def put(self, prefix: StoredPrefix) -> None:
        if prefix.nbytes > self.max_bytes:
            return  # larger than the whole store: not worth evicting everything for
        self._prefixes[prefix.keys] = prefix
        self._prefixes.move_to_end(prefix.keys)
        while self.nbytes > self.max_bytes:
            self._prefixes.popitem(last=False)
