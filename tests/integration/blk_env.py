"""Helpers for the blk integration tests: two domains, a vbd, and a backend to serve it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from xenpv.devices import VbdConfig, create_vbd
from xenpv.hv import Domain, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.topology import VbdFeatures
from xenpv.xenbus import DeviceId, xvd_number
from xenpv.xenstore.client import XenstoreClient, connect

TRANSPORTS = ["socket", "shm"]
DEVICE = DeviceId("vbd", frontend_domid=1, backend_domid=0, devid=xvd_number(0))


@dataclass
class Pair:
    backend: Domain
    guest: Domain
    xs: XenstoreClient
    directory: StaticDirectory
    keys: dict[int, DomainKey]


@asynccontextmanager
async def pair(
    tmp: Path, xs_address: str, transport: str, page_size: int, *, guest_memory: int = 96 << 20
) -> AsyncIterator[Pair]:
    directory = StaticDirectory()
    keys = {0: DomainKey.generate(0), 1: DomainKey.generate(1)}
    async with AsyncExitStack() as stack:
        doms = []
        for domid, size, memory in ((0, 4096, 32 << 20), (1, page_size, guest_memory)):
            dom = await stack.enter_async_context(
                open_domain(
                    domid=domid,
                    key=keys[domid],
                    directory=directory,
                    endpoint=f"unix:{tmp}/d{domid}.sock",
                    transport=transport,
                    page_size=size,
                    memory_bytes=memory,
                )
            )
            directory.register(domid, dom.endpoint, keys[domid].public_hex())
            doms.append(dom)
        xs = await stack.enter_async_context(connect(xs_address))
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


def read_image(path: Path) -> bytes:
    """The independent reader: the image file through plain open()/read()."""
    with open(path, "rb") as f:
        return f.read()
