"""Bearer-token API keys, compared in constant time.

A key's identity inside the server is a short hash of it, never the key: it namespaces that key's
conversations and counts its limits, and may appear in logs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True)
class Principal:
    key_id: str  # "anonymous" when authentication is off


ANONYMOUS = Principal("anonymous")


class KeyRing:
    def __init__(self, keys: list[str], require: bool = True):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self.require = require and bool(keys)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The principal for an `Authorization: Bearer <key>` header, or None if it is missing or wrong."""
        if not self.require:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        match = None
        for digest in self._digests:  # every key is compared: the time does not tell which matched
            if hmac.compare_digest(presented, digest):
                match = digest
        return None if match is None else Principal(match.hex()[:12])
