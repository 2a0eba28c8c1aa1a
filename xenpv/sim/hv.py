"""Emulated-hypervisor domains in a simulation: many `Domain`s in one trio run.

Each domain is the real `xenpv.hv.Domain` (grant table, event channels, links, handshake).
Their links are Unix socket pairs inside this one process: the link's fast path reads its
socket's fd directly, so the sim keeps that path as it is (no stream-kind seam in link.py),
and since every write is made synchronously by this one thread, what a link's reader finds
is decided by the (seeded) task order alone. The transport is the socket-copy kind (no
shared memory) and busy polling is off (it reads the wall clock).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from xenpv.hv import Domain, StaticDirectory, open_domain
from xenpv.sim.entropy import Entropy

SIM_TRANSPORT = "socket"
SIM_MEMORY_BYTES = 8 << 20


@asynccontextmanager
async def open_domains(
    entropy: Entropy, socket_dir: Path, domids: tuple[int, ...]
) -> AsyncIterator[list[Domain]]:
    """Run one domain per domid (keys derived from the seed) until the block ends."""
    directory = StaticDirectory()
    async with AsyncExitStack() as stack:
        domains: list[Domain] = []
        for domid in domids:
            key = entropy.domain_key(domid)
            domain = await stack.enter_async_context(
                open_domain(
                    domid=domid,
                    key=key,
                    directory=directory,
                    endpoint=f"unix:{socket_dir}/dom{domid}.sock",
                    transport=SIM_TRANSPORT,
                    memory_bytes=SIM_MEMORY_BYTES,
                    busy_poll_us=0,
                )
            )
            directory.register(domid, domain.endpoint, key.public_hex())
            domains.append(domain)
        yield domains
