"""Randomness for a simulated run, every draw derived from the one root seed.

Streams are split off the root seed by name exactly as the fault schedule does
(xenpv/faults/schedule.py `stream`), so an extra draw in one subsystem never shifts another.
"""

from __future__ import annotations

import hashlib
import random

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from xenpv.faults.schedule import stream
from xenpv.identity import DomainKey


class Entropy:
    """Named random streams and byte sources for one simulated run."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._counters: dict[str, int] = {}

    def stream(self, name: str) -> random.Random:
        return stream(self.seed, name)

    def token_bytes(self, name: str, size: int) -> bytes:
        """`size` bytes, a fresh draw on every call for `name` (challenges, nonces)."""
        count = self._counters.get(name, 0)
        self._counters[name] = count + 1
        out = b""
        block = 0
        while len(out) < size:
            out += hashlib.sha256(f"{self.seed}/{name}/{count}/{block}".encode()).digest()
            block += 1
        return out[:size]

    def domain_key(self, domid: int) -> DomainKey:
        """The domain's Ed25519 key: a real key, but derived from the seed, so a rerun of the
        seed signs the same bytes."""
        private = hashlib.sha256(f"{self.seed}/identity/{domid}".encode()).digest()
        return DomainKey(domid, Ed25519PrivateKey.from_private_bytes(private))

    def scheduler_seed(self) -> int:
        return stream(self.seed, "trio/scheduler").getrandbits(64)
