"""Peer discovery: where a domain's link endpoint is and which public key proves its domid.

The hypervisor only asks a `PeerDirectory`; the xenstore-backed one lives in the runtime
(`xenpv.runtime.directory`), because Xen's hypervisor knows nothing of xenstore."""

from __future__ import annotations

from typing import Protocol

from xenpv.hv.errors import LinkError


class PeerDirectory(Protocol):
    async def lookup(self, domid: int) -> tuple[str, str]:
        """(endpoint `unix:PATH` or `tcp:HOST:PORT`, pubkey hex) of `domid`, or LinkError."""
        ...


class StaticDirectory:
    """An in-memory directory (tests, benchmarks, single-process setups)."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[str, str]] = {}

    def register(self, domid: int, endpoint: str, pubkey_hex: str) -> None:
        self._entries[domid] = (endpoint, pubkey_hex)

    async def lookup(self, domid: int) -> tuple[str, str]:
        try:
            return self._entries[domid]
        except KeyError:
            raise LinkError(f"domain {domid} is not in the peer directory") from None
