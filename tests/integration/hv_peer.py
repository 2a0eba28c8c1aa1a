"""A domain in its own process, driven by the hypervisor integration tests.

    python tests/integration/hv_peer.py ROLE DOMID SEED_HEX ENDPOINT TRANSPORT PEER PEER_ENDPOINT
        PEER_PUBKEY [ARGS...]

Prints JSON lines on stdout: first {"ready": endpoint, "pubkey": hex}, then role-specific
lines. Roles:
- consumer GREF PORT SEED COUNT: map the peer's GREF, bind its PORT, consume COUNT records
  of stream SEED (tests/integration/hv_ring.py), print {"consumed": COUNT}.
- stall ALLOWED: grant one page to the peer and print {"gref": g, "port": p}; after the first
  ALLOWED replies every reply this domain would send is dropped and {"stalled": true} printed
  instead, so the test can kill this process while the peer's request is pending.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration import hv_ring
from xenpv import log
from xenpv.hv import Message, Msg, StaticDirectory, Verdict, open_domain
from xenpv.identity import DomainKey


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class StallReplies:
    """Fault double: let the first `allowed` replies through, then swallow every reply."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed

    def on_send(self, src: int, dst: int, message: Message) -> Verdict | None:
        if message.kind != Msg.REPLY:
            return None
        if self.allowed > 0:
            self.allowed -= 1
            return None
        say({"stalled": True})
        return Verdict(send=[])


async def main(argv: list[str]) -> None:
    role, domid, seed_hex, endpoint, transport, peer, peer_endpoint, peer_pubkey, *rest = argv
    key = DomainKey.from_seed_hex(int(domid), seed_hex)
    directory = StaticDirectory()
    directory.register(int(peer), peer_endpoint, peer_pubkey)
    faults = StallReplies(int(rest[0])) if role == "stall" else None
    async with open_domain(
        domid=int(domid),
        key=key,
        directory=directory,
        endpoint=endpoint,
        transport=transport,
        faults=faults,
        memory_bytes=4 << 20,
    ) as dom:
        say({"ready": dom.endpoint, "pubkey": key.public_hex()})
        if role == "consumer":
            gref, port, seed, count = (int(x) for x in rest)
            mapping = await dom.map_grants(int(peer), [gref])
            channel = await dom.bind_interdomain(int(peer), port)
            done = await hv_ring.consume(mapping, channel, seed, count)
            say({"consumed": done, "transport": dom.link_to(int(peer)).transport})  # type: ignore[union-attr]
            await mapping.unmap()
        elif role == "stall":
            page = dom.alloc_pages(1)[0]
            page.view[:4] = b"live"
            gref = dom.grants.grant_access(int(peer), page.frame)
            channel = await dom.alloc_unbound(int(peer))
            say({"gref": gref, "port": channel.port})
            await trio.sleep_forever()


if __name__ == "__main__":
    log.configure("warning", json=True)
    trio.run(main, sys.argv[1:])
