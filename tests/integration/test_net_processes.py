"""netfront and netback in separate processes: a guest process (64 KiB pages) runs netfront
and echoes every frame back; the backend domain (netback + switch) and a second guest live
in the test process. Frames of 60..65535 bytes (GSO too) go out and come back intact and in
order, over both transports; killing the guest process leaves the backend serving.

Run as a child: `python -m tests.integration.test_net_processes CONFIG_JSON`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from backends import netback
from backends.switch import LiveSwitch
from frontends.netfront import attach
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import first_line, open_unix_domains, reaped_on_exit
from tests.integration.test_net_integrity import mac_of, mac_text, tcp_frame
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.hv import XEN_PAGE_SIZE, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.toolstack.devices import create_vif
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import connect

REPO = Path(__file__).resolve().parents[2]
ECHO_DOMID = 1
SENDER_DOMID = 2


async def echo_guest(config: dict[str, Any]) -> None:
    """The child: a 64 KiB-page guest whose netfront sends every frame back to its source."""
    directory = StaticDirectory()
    for domid, endpoint, pubkey in config["peers"]:
        directory.register(domid, endpoint, pubkey)
    key = DomainKey.from_seed_hex(ECHO_DOMID, config["seed"])
    async with (
        open_domain(
            domid=ECHO_DOMID,
            key=key,
            directory=directory,
            endpoint=config["endpoint"],
            transport=config["transport"],
            page_size=65536,
            memory_bytes=96 << 20,
        ) as dom,
        connect(config["xenstore"]) as xs,
        attach(dom, xs, DeviceId("vif", ECHO_DOMID, 0, 0), max_queues=2) as front,
    ):
        await front.wait_connected()
        print("READY", flush=True)
        while True:
            got = await front.receive()
            frame = got.frame[6:12] + got.frame[:6] + got.frame[12:]
            await front.send(frame, gso=got.gso, csum_blank=got.csum_blank)


@asynccontextmanager
async def echo_process(config: dict[str, Any]) -> AsyncIterator[trio.Process]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "tests.integration.test_net_processes", json.dumps(config)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    async with reaped_on_exit(process):
        assert await first_line(process, "echo guest") == b"READY"
        yield process


@pytest.mark.parametrize("transport", ["socket", "shm"])
async def test_echo_through_a_guest_process(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(transport)
    directory = StaticDirectory()
    echo_key = DomainKey.generate(ECHO_DOMID)
    echo_endpoint = f"unix:{tmp_path}/d{ECHO_DOMID}.sock"
    directory.register(ECHO_DOMID, echo_endpoint, echo_key.public_hex())
    with trio.fail_after(90):
        async with AsyncExitStack() as stack:
            specs = [(domid, XEN_PAGE_SIZE, 48 << 20) for domid in (0, SENDER_DOMID)]
            opened = await open_unix_domains(stack, directory, tmp_path, transport, specs)
            doms = {dom.domid: dom for dom in opened}
            xs = await stack.enter_async_context(connect(xenstored.unix))
            switch: LiveSwitch[Any] = LiveSwitch(queue_depth=1024)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            vifs = {}
            for domid in (ECHO_DOMID, SENDER_DOMID):
                device = DeviceId("vif", domid, 0, 0)
                await create_vif(xs, device, mac=mac_text(mac_of(domid)))
                vifs[domid] = netback.Vif(doms[0], xs, device, switch)
                nursery.start_soon(vifs[domid].run)
            config = {
                "seed": echo_key.seed_hex(),
                "endpoint": echo_endpoint,
                "transport": transport,
                "xenstore": xenstored.unix,
                "peers": [
                    [domid, dom.endpoint, dom.key.public_hex()] for domid, dom in doms.items()
                ],
            }
            echo = await stack.enter_async_context(echo_process(config))
            front = await stack.enter_async_context(
                attach(doms[SENDER_DOMID], xs, DeviceId("vif", SENDER_DOMID, 0, 0))
            )
            await front.wait_connected()
            sizes = [60, 1514, 4096, 4097, 9000, 20000, 65535]
            sent = []
            for seq, size in enumerate(sizes * 2):
                frame = tcp_frame(mac_of(ECHO_DOMID), front.mac, 5000, seq, size, rng)
                gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
                await front.send(frame, gso=gso, csum_blank=True)
                sent.append(frame)
                got = await front.receive()  # one at a time: the backend never has to drop
                assert got.frame == frame[6:12] + frame[:6] + frame[12:]
                assert (got.gso is not None) == (gso is not None) and got.csum_blank
            assert vifs[ECHO_DOMID].stats().rx_packets == len(sent)

            # the guest process dies: frames still flow towards its (dead) vif and the
            # backend keeps serving the other guest
            echo.kill()
            await echo.wait()
            before = vifs[SENDER_DOMID].stats().tx_packets
            for seq in range(5):
                await front.send(tcp_frame(mac_of(ECHO_DOMID), front.mac, 5001, seq, 3000, rng))
                await front.send(tcp_frame(b"\xff" * 6, front.mac, 5002, seq, 100, rng))
            await vifs[SENDER_DOMID].wait_until(lambda vif: vif.stats().tx_packets >= before + 10)
            assert vifs[SENDER_DOMID].connected and front.connected
            assert front.stats()["tx_errors"] == 0

            # a new guest process takes the device over (its frontend starts over at
            # Initialising, the backend resets and reconnects): echoes flow again
            connects = vifs[ECHO_DOMID].connections
            async with echo_process(config):
                await vifs[ECHO_DOMID].wait_until(
                    lambda vif: vif.connected and vif.connections > connects
                )
                for seq, size in enumerate([60, 9000, 65535]):
                    frame = tcp_frame(mac_of(ECHO_DOMID), front.mac, 6000, seq, size, rng)
                    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
                    await front.send(frame, gso=gso, csum_blank=True)
                    got = await front.receive()
                    while got.frame[:6] != front.mac or got.frame[12:14] != b"\x08\x00":
                        got = await front.receive()  # skip anything flooded meanwhile
                    assert got.frame == frame[6:12] + frame[:6] + frame[12:]


if __name__ == "__main__":
    from xenpv import log

    log.configure("warning", json=True)
    trio.run(echo_guest, json.loads(sys.argv[1]))
