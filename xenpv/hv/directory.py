"""Peer discovery: where a domain's link endpoint is and which public key proves its domid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from xenpv.hv.errors import LinkError
from xenpv.identity import link_path, pubkey_path
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from xenpv.xenstore.client import XenstoreClient


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


class XenstoreDirectory:
    """Reads what the toolstack published: `link_path(domid)` and `pubkey_path(domid)`."""

    def __init__(self, xs: XenstoreClient) -> None:
        self._xs = xs

    async def lookup(self, domid: int) -> tuple[str, str]:
        try:
            endpoint = await self._xs.try_read(link_path(domid))
            pubkey = await self._xs.try_read(pubkey_path(domid))
        except XsError as exc:
            raise LinkError(f"cannot look up domain {domid} in xenstore: {exc}") from None
        if endpoint is None or pubkey is None:
            raise LinkError(f"domain {domid} has no published link endpoint or key")
        return endpoint.decode(), pubkey.decode()
