"""The crash test: blkback in its own process is killed with SIGKILL during a
write stream and restarted; the frontend recovers (re-issuing what was in flight) and every
acknowledged write is in the image file, read back by an independent reader."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from frontends.blkfront import attach
from tests.integration.blk_env import DEVICE, make_vbd, read_image
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import first_line, reaped_on_exit
from xenpv.hv import Domain, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenstore.client import XenstoreClient, connect

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("blk_backend_proc.py")
DISK = 8 << 20
WRITERS = 8
REGION = DISK // WRITERS


@asynccontextmanager
async def backend_process(
    xs_address: str,
    key: DomainKey,
    endpoint: str,
    transport: str,
    guest_key: DomainKey,
    guest_endpoint: str,
    log_path: Path,
) -> AsyncIterator[trio.Process]:
    command = [
        sys.executable,
        str(SCRIPT),
        xs_address,
        key.seed_hex(),
        endpoint,
        transport,
        str(DEVICE.frontend_domid),
        guest_endpoint,
        guest_key.public_hex(),
        str(DEVICE.devid),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log_file = log_path.open("ab")
    try:
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=log_file, env=env
        )
    finally:
        log_file.close()
    async with reaped_on_exit(process):
        assert "ready" in json.loads(await first_line(process, "backend process"))
        yield process


@dataclass
class RestartableBackend:
    """Guest domain 1 in this process, attached to vbd `DEVICE`, whose backend (domain 0) runs
    in a child process the test starts, kills and starts again with `backend()`."""

    guest: Domain
    xs: XenstoreClient
    _args: tuple[str, DomainKey, str, str, DomainKey, str, Path]

    def backend(self) -> AbstractAsyncContextManager[trio.Process]:
        return backend_process(*self._args)


@asynccontextmanager
async def restartable_backend(
    tmp: Path,
    xs_address: str,
    transport: str,
    page_size: int,
    image: Path,
    size: int,
    features: VbdFeatures,
) -> AsyncIterator[RestartableBackend]:
    """The guest and vbd (on `image`) of a `RestartableBackend`; no backend runs yet."""
    keys = {0: DomainKey.generate(0), 1: DomainKey.generate(1)}
    backend_endpoint = f"unix:{tmp}/d0.sock"
    directory = StaticDirectory()
    directory.register(0, backend_endpoint, keys[0].public_hex())
    async with (
        open_domain(
            domid=1,
            key=keys[1],
            directory=directory,
            endpoint=f"unix:{tmp}/d1.sock",
            transport=transport,
            page_size=page_size,
            memory_bytes=64 << 20,
        ) as guest,
        connect(xs_address) as xs,
    ):
        await make_vbd(xs, image=str(image), size=size, features=features)
        args = (
            xs_address,
            keys[0],
            backend_endpoint,
            transport,
            keys[1],
            guest.endpoint,
            tmp / "backend.log",
        )
        yield RestartableBackend(guest, xs, args)


@pytest.mark.parametrize("page_size", [4096, 65536])
async def test_kill_backend_during_write_stream(
    tmp_path: Path, xenstored: Xenstored, transport: str, page_size: int
) -> None:
    image = tmp_path / "disk.img"
    model = bytearray(DISK)
    acked = 0
    with trio.fail_after(60):
        async with (
            restartable_backend(
                tmp_path,
                xenstored.unix,
                transport,
                page_size,
                image,
                DISK,
                VbdFeatures(ring_page_order=2, queues=2),
            ) as rig,
            attach(rig.guest, rig.xs, DEVICE) as front,
        ):
            milestones = {40: trio.Event(), 120: trio.Event()}

            async def writer(w: int, stop: trio.Event) -> None:
                nonlocal acked
                rng = random.Random(w)
                op = 0
                while not stop.is_set():
                    length = rng.choice([512, 4096, 16384, 65536, 196608])
                    offset = w * REGION + rng.randrange(0, (REGION - length) // 512 + 1) * 512
                    data = rng.randbytes(length)
                    await front.write(offset, data)
                    model[offset : offset + length] = data  # acknowledged: must survive
                    acked += 1
                    op += 1
                    for mark, event in milestones.items():
                        if acked >= mark:
                            event.set()

            stop = trio.Event()
            finished = trio.Event()
            running = WRITERS

            async def run_writer(w: int) -> None:
                nonlocal running
                await writer(w, stop)
                running -= 1
                if not running:
                    finished.set()

            async with trio.open_nursery() as writers:
                async with rig.backend() as first:
                    await front.wait_connected()
                    for w in range(WRITERS):
                        writers.start_soon(run_writer, w)
                    await milestones[40].wait()
                    first.send_signal(signal.SIGKILL)  # mid-stream, writes in flight
                    await first.wait()
                killed_at = acked
                async with rig.backend():
                    await milestones[120].wait()
                    stop.set()
                    await finished.wait()  # the last writes complete on this backend
            assert acked >= 120 and killed_at < acked
            assert front.connections == 2
            assert front.engine.reissued > 0
    on_disk = read_image(image)
    assert on_disk == bytes(model)
