"""Peer discovery through xenstore: the link endpoint and public key the toolstack published."""

from __future__ import annotations

from xenpv.hv.errors import LinkError
from xenpv.identity import link_path, pubkey_path
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import XsError


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
