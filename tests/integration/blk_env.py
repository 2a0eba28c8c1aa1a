"""Helpers for the blk integration tests: two domains, a vbd, and a backend to serve it.

`pair` (a backend domain, a guest and a xenstore connection) serves the net tests too."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from backends.blkback import BlkbackDevice
from frontends.blkfront import Blkfront
from tests.integration.hv_pair import open_unix_domains
from xenpv.hv import Domain, StaticDirectory
from xenpv.identity import DomainKey
from xenpv.toolstack.devices import VbdConfig, create_vbd
from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus.core import DeviceId, xvd_number
from xenpv.xenstore.client import XenstoreClient, connect

DEVICE = DeviceId("vbd", frontend_domid=1, backend_domid=0, devid=xvd_number(0))
# Every optional blkif feature switched off: one page, one queue, direct requests only.
FEATURES_OFF = VbdFeatures(
    ring_page_order=0,
    queues=1,
    indirect_segments=0,
    persistent=False,
    flush=False,
    barrier=False,
    discard=False,
)


@dataclass
class Pair:
    backend: Domain
    guest: Domain
    xs: XenstoreClient
    directory: StaticDirectory
    keys: dict[int, DomainKey]


@asynccontextmanager
async def pair(
    tmp: Path,
    xs_address: str,
    transport: str,
    page_size: int,
    *,
    guest_memory: int = 96 << 20,
    backend_page: int = 4096,
    backend_memory: int = 32 << 20,
) -> AsyncIterator[Pair]:
    """Backend domain 0 and guest domain 1 (of `page_size`), and a xenstore connection."""
    directory = StaticDirectory()
    async with AsyncExitStack() as stack:
        doms = await open_unix_domains(
            stack,
            directory,
            tmp,
            transport,
            [(0, backend_page, backend_memory), (1, page_size, guest_memory)],
        )
        xs = await stack.enter_async_context(connect(xs_address))
        keys = {dom.domid: dom.key for dom in doms}
        yield Pair(doms[0], doms[1], xs, directory, keys)


async def make_vbd(
    xs: XenstoreClient,
    *,
    image: str | None = None,
    size: int = 8 << 20,
    sector_size: int = 512,
    features: VbdFeatures | None = None,
    device: DeviceId = DEVICE,
) -> DeviceId:
    await create_vbd(
        xs,
        device,
        VbdConfig(
            image=image, size=size, sector_size=sector_size, features=features or VbdFeatures()
        ),
    )
    return device


def start_backend(nursery: trio.Nursery, p: Pair) -> trio.CancelScope:
    """Serve DEVICE from the backend domain in a task of `nursery`; cancelling the scope
    that is returned stops this backend alone, as if its process had gone away."""
    scope = trio.CancelScope()

    async def serve() -> None:
        with scope:
            await BlkbackDevice(p.backend, p.xs, DEVICE).run()

    nursery.start_soon(serve)
    return scope


class QuarterWriters:
    """Four tasks writing random data, each in its own quarter of the disk (`model` has the
    disk's size), until `stop()`; every acknowledged write is applied to `model`, so the disk
    must end up equal to it. `reached(n)` waits for n acknowledged writes, n one of `marks`."""

    def __init__(
        self, front: Blkfront, model: bytearray, lengths: Sequence[int], marks: Sequence[int]
    ) -> None:
        self.front, self.model, self.lengths = front, model, lengths
        self.acked = 0
        self._marks = {mark: trio.Event() for mark in marks}
        self._stop = trio.Event()

    def start(self, nursery: trio.Nursery) -> None:
        for quarter in range(4):
            nursery.start_soon(self._write, quarter)

    async def reached(self, mark: int) -> None:
        await self._marks[mark].wait()

    def stop(self) -> None:
        self._stop.set()

    async def _write(self, quarter: int) -> None:
        rng = random.Random(quarter)
        region = len(self.model) // 4
        while not self._stop.is_set():
            length = rng.choice(self.lengths)
            offset = quarter * region + rng.randrange(0, (region - length) // 512) * 512
            data = rng.randbytes(length)
            await self.front.write(offset, data)
            self.model[offset : offset + length] = data
            self.acked += 1
            for mark, event in self._marks.items():
                if self.acked >= mark:
                    event.set()


def read_image(path: Path) -> bytes:
    """The independent reader: the image file through plain open()/read()."""
    with open(path, "rb") as f:
        return f.read()
