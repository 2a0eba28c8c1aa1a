"""Peers that the toolstack releases: close the links to them.

A killed domain process is noticed by its links (EOF). A domain the toolstack destroys while
its process lingers is noticed through xenstore: `watch_releases` follows `@releaseDomain`
and breaks the link to every peer that is no longer there, so ports to it close and mappings
of its grants die, exactly as if it had died.

`open_published_domain` is `hv.open_domain` as a runtime uses it: peers are found through
xenstore (`XenstoreDirectory`) and released peers are dropped (`watch_releases`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
import trio

from xenpv.hv.domain import Domain, open_domain
from xenpv.identity import pubkey_path
from xenpv.runtime.directory import XenstoreDirectory
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()


async def peer_exists(xs: XenstoreClient, domid: int) -> bool:
    """Introduced (asked when privileged) or, for a guest, still published by the toolstack."""
    try:
        return await xs.is_domain_introduced(domid)
    except XsError as exc:
        if exc.errno_name != "EACCES":
            raise
    return await xs.try_read(pubkey_path(domid)) is not None


async def watch_releases(domain: Domain, xs: XenstoreClient) -> None:
    """Run forever (in the domain's nursery): disconnect peers as they are released."""
    async with xs.watch("@releaseDomain") as events:
        async for _path, _token in events:
            for peer in domain.linked_peers():
                if not await peer_exists(xs, peer):
                    log.info("peer released", domid=domain.domid, peer=peer)
                    domain.disconnect(peer, f"domain {peer} was released")


@asynccontextmanager
async def open_published_domain(xs: XenstoreClient, **options: Any) -> AsyncIterator[Domain]:
    """`open_domain(**options)` with peers looked up in xenstore through `xs` and released
    peers disconnected while the block runs."""
    async with (
        open_domain(directory=XenstoreDirectory(xs), **options) as domain,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(watch_releases, domain, xs)
        try:
            yield domain
        finally:
            nursery.cancel_scope.cancel()
