"""A bounded cache of recently verified tokens, so a reconnect does not pay for a JWT decode.

What it may and may not do, because a cache in front of a verifier is where
tokens become valid that should not be:

* Only what the verifier accepted goes in; a token it refused (garbage,
  a bad signature, expired) is never stored, so nothing an attacker sends
  without a valid token makes the cache grow.
* Entries are keyed by the SHA-256 of the whole token, never by the token:
  the cache holds no bearer credential, and two tokens share an entry only
  if they collide under SHA-256.
* A hit is served only while ``not_before <= now < expires`` by the wall
  clock the verifier uses, with no leeway: the later of ``nbf`` and ``iat``,
  and ``exp``. Outside that window (the token expired, or the clock went
  back) the caller verifies the token in full, and the verifier decides.
* The cache belongs to one verifier configuration (key, algorithm,
  audience, issuer); the verifier clears it whenever that changes.
* It is bounded in entries and in bytes (an estimate of each entry's
  memory, the identity's strings and room list included), least recently
  used first out, whatever tokens arrive.

Pure logic with the clock passed in, so every claim above is unit-tested.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import Identity

__all__ = ["VerifiedTokenCache", "token_digest", "ENTRY_OVERHEAD"]

# Bytes an entry costs besides its identity's own strings: the digest
# (a 32-byte bytes object), the entry tuple, two ints, the ordered dict's
# slot and link, the Identity object. Measured with tracemalloc, rounded up.
ENTRY_OVERHEAD = 512


def token_digest(token: str) -> bytes:
    """The cache key: SHA-256 of the whole token (``surrogatepass``: a query string may carry anything)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _footprint(identity: Identity) -> int:
    size = ENTRY_OVERHEAD + sys.getsizeof(identity.user_id) + sys.getsizeof(identity.username)
    rooms = identity.rooms
    if rooms:
        size += sys.getsizeof(rooms) + sum(sys.getsizeof(room) for room in rooms)
    return size


class VerifiedTokenCache:
    """Identities of tokens verified recently, bounded in entries and bytes."""

    __slots__ = ("max_entries", "max_bytes", "size_bytes", "hits", "misses", "flushes", "_entries")

    def __init__(self, max_entries: int = 20_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self.hits = 0
        self.misses = 0
        self.flushes = 0  # clears: key or claims configuration changes
        # digest -> (identity, not_before, expires, footprint)
        self._entries: OrderedDict[bytes, tuple[Identity, int, int, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str, now: float, key: bytes | None = None) -> Identity | None:
        """The identity of ``token`` if it was verified and is valid at ``now`` (wall clock).

        ``key`` is ``token_digest(token)`` when the caller has it (a miss is then
        ``put`` with the same key: one SHA-256 per fresh token, not two).
        """
        if key is None:
            key = token_digest(token)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        identity, not_before, expires, _ = entry
        if not not_before <= now < expires:
            # Expired (or the clock went back): gone for good, the verifier decides.
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return identity

    def put(
        self, token: str, identity: Identity, not_before: int, expires: int, now: float, key: bytes | None = None
    ) -> None:
        """Remember a token the verifier accepted at ``now``, valid from ``not_before`` until ``expires``
        (``key``: its ``token_digest``, if the caller has it)."""
        if not not_before <= now < expires:
            return  # accepted only thanks to the leeway: not worth caching, never served early or late
        size = _footprint(identity)
        if size > self.max_bytes or self.max_entries <= 0:
            return
        if key is None:
            key = token_digest(token)
        self._drop(key)
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self.size_bytes + size > self.max_bytes):
            _, (_, _, _, evicted) = entries.popitem(last=False)
            self.size_bytes -= evicted
        entries[key] = (identity, not_before, expires, size)
        self.size_bytes += size

    def clear(self) -> None:
        """Forget everything (the verifier's key or claims configuration changed)."""
        self._entries.clear()
        self.size_bytes = 0
        self.flushes += 1

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size_bytes -= entry[3]
