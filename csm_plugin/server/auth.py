"""Bearer-token API keys, compared in constant time.

A key's identity inside the server is a short hash of it, never the key: it namespaces that key's
conversations and counts its limits, and may appear in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections import OrderedDict, deque
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


class AuthThrottle:
    """Failed authentications per client address: after `limit` failures within `window_s`, that
    address is refused (429, without looking at its key) until `window_s` after its latest failure
    that counted. Bounded memory: at most `max_addresses` addresses are tracked, the least recently
    failing are forgotten first."""

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = 10_000):
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after_s(self, address: str, now: float | None = None) -> float | None:
        """Seconds until `address` may try again, or None if it may now."""
        failures = self._failures.get(address)
        if failures is None:
            return None
        now = time.monotonic() if now is None else now
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        if len(failures) < self.limit:
            return None
        return max(1.0, failures[-1] + self.window_s - now)

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._failures.setdefault(address, deque(maxlen=self.limit))
        failures.append(now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: list) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the last address in
    X-Forwarded-For that is not one of the trusted proxies (what the nearest untrusted hop said)."""
    peer = peer or "unknown"
    if not trusted_proxies or not forwarded_for or not _trusted(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer


def _trusted(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
