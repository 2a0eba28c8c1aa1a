"""Domains in two processes: peer death during map and copy, and the ring property test."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration import hv_ring
from tests.integration.hv_pair import (
    TRANSPORT_IDS,
    TRANSPORTS,
    PeerProcess,
    endpoint_for,
    registered_peer,
)
from xenpv.hv import (
    CopyDirection,
    CopyOp,
    Domain,
    EventChannelClosed,
    PeerGone,
    StaticDirectory,
    open_registered,
)

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)


@asynccontextmanager
async def stalling_peer(
    tmp: Path, transport: str, kind: str, replies: int
) -> AsyncIterator[tuple[Domain, PeerProcess, dict[str, Any]]]:
    """Domain 0 here and a "stall" peer, domain 1, in a child process that sends `replies`
    replies and then stalls every later one; with the grant and port the peer offered."""
    async with AsyncExitStack() as stack:
        directory = StaticDirectory()
        back = await open_registered(
            stack, directory, 0, endpoint_for(tmp, 0, kind), transport=transport
        )
        async with registered_peer(
            "stall", 1, tmp, kind, transport, back, directory, replies
        ) as peer:
            yield back, peer, await peer.line()


async def test_peer_killed_during_map(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(30):
        async with stalling_peer(tmp_path, transport, kind, 0) as (back, peer, grant):
            outcome: list[BaseException] = []

            async def map_it() -> None:
                try:
                    await back.map_grants(1, [grant["gref"]])
                except PeerGone as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(map_it)
                assert await peer.line() == {"stalled": True}  # the request is pending
                peer.kill()
            assert len(outcome) == 1 and isinstance(outcome[0], PeerGone)
            with pytest.raises(PeerGone):  # and the peer is gone for new operations too
                await back.map_grants(1, [grant["gref"]])


async def test_peer_killed_during_copy(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(30):
        # two replies get through (map, bind), everything after stalls
        async with stalling_peer(tmp_path, transport, kind, 2) as (back, peer, grant):
            mapping = await back.map_grants(1, [grant["gref"]])
            assert bytes(mapping.view[:4]) == b"live"
            channel = await back.bind_interdomain(1, grant["port"])
            buf = bytearray(4)
            copy = [CopyOp(CopyDirection.FROM_REMOTE, 1, grant["gref"], 0, 4, memoryview(buf))]
            outcome: list[BaseException] = []

            async def copy_it() -> None:
                try:
                    while True:  # on shm copies need no round trip: stall on an unmap
                        await back.grant_copy(copy)
                        if mapping.shared:
                            await mapping.unmap()
                except PeerGone as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy_it)
                assert await peer.line() == {"stalled": True}
                peer.kill()
            assert len(outcome) == 1
            with pytest.raises(EventChannelClosed):
                await channel.wait()
            if not mapping.shared:
                with pytest.raises(PeerGone):
                    mapping.view  # noqa: B018 (a dead mapping refuses use)
            with pytest.raises(PeerGone):
                await back.grant_copy(copy)


@settings(
    max_examples=2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(min_value=0, max_value=2**32))
async def test_ring_of_records_between_processes(seed: int, transport: str, kind: str) -> None:
    count = 3000
    with trio.fail_after(60), tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        async with AsyncExitStack() as stack:
            directory = StaticDirectory()
            front = await open_registered(
                stack, directory, 1, endpoint_for(tmp_path, 1, kind), transport=transport
            )
            page = front.alloc_pages(1)[0]
            hv_ring.init(page)
            gref = front.grants.grant_access(2, page.frame)
            channel = await front.alloc_unbound(2)
            args = (gref, channel.port, seed, count)
            async with registered_peer(
                "consumer", 2, tmp_path, kind, transport, front, directory, *args
            ) as consumer:
                await hv_ring.produce(page, channel, seed, count)
                result = await consumer.line()
                assert result == {"consumed": count, "transport": transport}
