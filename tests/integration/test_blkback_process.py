"""blkback in its own process: I/O across processes, and `kill -9` of the backend during a
write stream (every acknowledged write is on disk; a restarted backend picks the device up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import REPO, PeerProcess
from tests.integration.test_blkback import (
    TRANSPORT_IDS,
    TRANSPORTS,
    MiniFront,
    pattern,
    read_image,
    vbd,
    wait_backend,
)
from xenpv.abi.blkif import BLKIF_OP_WRITE, BLKIF_RSP_OKAY, BlkifRequest
from xenpv.hv import Domain, HvError, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.toolstack.devices import VbdConfig, create_vbd
from xenpv.xenbus.core import Closed, Initialising
from xenpv.xenbus.handshake import publish
from xenpv.xenstore.client import connect

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)

# The backend domain process: dom0 serving one vbd until killed.
CHILD = """
import json, sys, trio
from backends.blkback import serve
from xenpv.hv import StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import connect

async def main(seed, endpoint, transport, xs_address, fe, fe_endpoint, fe_pubkey, devid):
    directory = StaticDirectory()
    directory.register(int(fe), fe_endpoint, fe_pubkey)
    key = DomainKey.from_seed_hex(0, seed)
    async with open_domain(domid=0, key=key, directory=directory, endpoint=endpoint,
                           transport=transport, memory_bytes=8 << 20) as dom:
        async with connect(xs_address) as xs:
            print(json.dumps({"ready": dom.endpoint}), flush=True)
            await serve(dom, xs, DeviceId("vbd", int(fe), 0, int(devid)))
            print(json.dumps({"removed": True}), flush=True)

trio.run(main, *sys.argv[1:])
"""


@asynccontextmanager
async def backend_process(
    key: DomainKey, endpoint: str, transport: str, xenstored: Xenstored, front: Domain
) -> AsyncIterator[PeerProcess]:
    command = [
        sys.executable,
        "-c",
        CHILD,
        key.seed_hex(),
        endpoint,
        transport,
        xenstored.unix,
        str(front.domid),
        front.endpoint,
        front.key.public_hex(),
        "51712",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    try:
        peer = PeerProcess(process)
        assert "ready" in await peer.line()
        yield peer
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def test_kill_backend_during_write_stream(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    image = xs_workdir / "disk.img"
    device = vbd(1)
    chunk = 16384
    with trio.fail_after(60):
        directory = StaticDirectory()
        back_key = DomainKey.generate(0)
        back_endpoint = f"unix:{xs_workdir}/dom0.sock"
        directory.register(0, back_endpoint, back_key.public_hex())
        front_key = DomainKey.generate(1)
        async with (
            connect(xenstored.unix) as xs,
            open_domain(
                domid=1,
                key=front_key,
                directory=directory,
                endpoint=f"unix:{xs_workdir}/dom1.sock",
                transport=transport,
            ) as dom1,
        ):
            disk_size = 8 << 20
            await create_vbd(xs, device, VbdConfig(str(image), disk_size))
            acked: list[int] = []  # offsets whose write the backend acknowledged
            async with backend_process(back_key, back_endpoint, transport, xenstored, dom1) as be:
                front = MiniFront(dom1, xs, device, npages=64)
                await front.start()
                assert await front.write(0, pattern(1, 8192)) == BLKIF_RSP_OKAY
                assert await front.read(0, 8192, page=60) == pattern(1, 8192)

                enough = trio.Event()

                async def stream() -> None:
                    n = 0
                    try:
                        while True:  # batches of 4 writes of 16 KiB at distinct offsets
                            if (n + 5) * chunk > disk_size:  # the disk is full: stop here
                                enough.set()
                                return
                            batch = []
                            for _ in range(4):
                                n += 1
                                offset = n * chunk
                                slot = (n % 4) * 4
                                front.put_data(slot, pattern(n, chunk))
                                request = BlkifRequest(
                                    BLKIF_OP_WRITE,
                                    offset,
                                    offset // 512,
                                    front.segments(slot, chunk),
                                )
                                batch.append(request)
                            for response in await front.run(batch):
                                if response.status == BLKIF_RSP_OKAY:
                                    acked.append(response.id)
                            if len(acked) >= 40:
                                enough.set()
                    except HvError:  # the backend died under the stream
                        return

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream)
                    await enough.wait()
                    be.kill()
            assert len(acked) >= 40
            for offset in acked:  # every acknowledged write reached the image
                n = offset // chunk
                assert read_image(image, offset, chunk) == pattern(n, chunk), n

            # A new backend process picks the device up: Closed, then the frontend starts over.
            async with backend_process(back_key, back_endpoint, transport, xenstored, dom1):
                assert await wait_backend(xs, device, Closed) == Closed
                await publish(xs, device.frontend, {}, state=Closed)
                await publish(xs, device.frontend, {}, state=Initialising)
                front = MiniFront(dom1, xs, device, npages=64)
                await front.start()
                for offset in acked:
                    n = offset // chunk
                    assert await front.read(offset, chunk) == pattern(n, chunk)
                # the stream never wrote between the first 8 KiB and its first chunk
                assert await front.write(8192, pattern(999, 4096)) == BLKIF_RSP_OKAY
            assert read_image(image, 8192, 4096) == pattern(999, 4096)
