"""netback in its own process (a backend domain), frontends in the test process.

The child (this file run as a script) opens domain 0, connects to xenstored, and serves every
vif listed under its backend directory with `backends.netback.serve`, all on one switch. The
test kills it mid-life and starts a new one: the xenbus restart rules bring the guests back.

    python tests/integration/test_netback_process.py XS_ADDRESS SEED ENDPOINT TRANSPORT \
        DOMID=ENDPOINT=PUBKEY...
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backends.netback import serve
from backends.switch import LiveSwitch
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import first_line, reaped_on_exit
from tests.integration.test_netback import TRANSPORTS, StubFront, frame, mac, wait_state, world
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.hv import Domain, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.toolstack.devices import create_vif, list_devices
from xenpv.xenbus.core import Closed, Connected, DeviceId
from xenpv.xenbus.handshake import publish
from xenpv.xenstore.client import XenstoreClient, connect

REPO = Path(__file__).resolve().parents[2]


async def child(
    xs_address: str, seed: str, endpoint: str, transport: str, peers: list[str]
) -> None:
    directory = StaticDirectory()
    for peer in peers:
        domid, peer_endpoint, pubkey = peer.split("=")
        directory.register(int(domid), peer_endpoint, pubkey)
    key = DomainKey.from_seed_hex(0, seed)
    async with (
        open_domain(
            domid=0, key=key, directory=directory, endpoint=endpoint, transport=transport
        ) as dom,
        connect(xs_address) as xs,
    ):
        switch: LiveSwitch[VirtioNetHdr] = LiveSwitch()
        devices = await list_devices(xs, 0)
        print("READY", flush=True)
        async with trio.open_nursery() as nursery:
            for device in devices:
                nursery.start_soon(serve, dom, xs, device, switch)


@asynccontextmanager
async def backend_process(
    xenstored: Xenstored, transport: str, key: DomainKey, endpoint: str, guests: dict[int, Domain]
) -> AsyncIterator[trio.Process]:
    peers = [f"{d}={dom.endpoint}={dom.key.public_hex()}" for d, dom in guests.items()]
    command = [
        sys.executable,
        __file__,
        xenstored.unix,
        key.seed_hex(),
        endpoint,
        transport,
        *peers,
    ]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, cwd=REPO)
    async with reaped_on_exit(process):
        assert (await first_line(process, "backend")).startswith(b"READY")
        yield process


async def talk(a: StubFront, b: StubFront, seq: int) -> None:
    for size in (60, 1500, 20000):
        there = frame(1, 2, size, seq)
        assert await a.send(there) == [0] * -(-size // 4096)
        assert (await b.receive()).data == there
    back = frame(2, 1, 800, seq)
    assert await b.send(back) == [0]
    assert (await a.receive()).data == back


async def restart_front(xs: XenstoreClient, stub: StubFront) -> None:
    """What netfront does when a restarted backend writes Closed: close, then start over."""
    await wait_state(xs, stub.device.backend, Closed)
    await publish(xs, stub.device.frontend, {}, state=Closed)
    await stub.reconnect()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_backend_in_its_own_process_survives_restart(
    xenstored: Xenstored, transport: str
) -> None:
    with trio.fail_after(60):
        key = DomainKey.generate(0)
        endpoint = f"unix:{xenstored.workdir}/d0.sock"
        async with (
            connect(xenstored.unix) as xs,
            world(xenstored.workdir, transport, {1: 4096, 2: 16384}) as doms,
        ):
            assert isinstance(doms[1].directory, StaticDirectory)
            doms[1].directory.register(0, endpoint, key.public_hex())
            stubs = []
            for domid in (1, 2):
                device = DeviceId("vif", domid, 0, 0)
                await create_vif(xs, device, mac=":".join(f"{b:02x}" for b in mac(domid)))
                stubs.append(StubFront(doms[domid], xs, device))
            a, b = stubs
            async with backend_process(xenstored, transport, key, endpoint, doms) as first:
                await a.connect()
                await b.connect()
                await talk(a, b, 1)
                first.kill()
            async with backend_process(xenstored, transport, key, endpoint, doms):
                # The new backend finds Connected frontends with rings it knows nothing of.
                await restart_front(xs, a)
                await restart_front(xs, b)
                assert await xs.read(f"{a.device.backend}/state") == str(int(Connected)).encode()
                await talk(a, b, 2)


if __name__ == "__main__":
    trio.run(child, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
