"""blkback against a real xenstored and real domains, driven by a minimal test frontend.

`MiniFront` speaks the protocol straight from the headers (FrontRing, blkif codec, xenstore
keys), with no recovery logic, so each test controls every byte the backend sees. Every test
runs on the socket and shared-memory transports.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from backends.blkback import BlkbackDevice
from backends.blkback.keys import BackendConfig
from backends.storage import (
    MemoryDisk,
    ReadBuffer,
    Storage,
    StorageError,
    StorageErrorKind,
    StorageOp,
    WriteBuffer,
)
from tests.integration.blk_env import FEATURES_OFF
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import domains
from xenpv.abi.blkif import (
    BLKIF_NATIVE,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_X86_32,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
    encode_indirect_pages,
)
from xenpv.abi.ring import FrontRing
from xenpv.hv import Domain, EventChannel, Page
from xenpv.toolstack.devices import VbdConfig, create_vbd, destroy_device
from xenpv.xenbus.core import (
    Closed,
    Closing,
    Connected,
    DeviceId,
    Initialised,
    InitWait,
    XenbusState,
)
from xenpv.xenbus.handshake import publish, read_keys, read_state
from xenpv.xenstore.client import XenstoreClient, connect

TRANSPORTS = [("socket", "unix"), ("shm", "unix")]
TRANSPORT_IDS = ["socket", "shm"]
MiB = 1 << 20


def vbd(frontend: int, devid: int = 51712) -> DeviceId:
    return DeviceId("vbd", frontend_domid=frontend, backend_domid=0, devid=devid)


def read_image(path: Path, offset: int, length: int) -> bytes:
    """The independent reader: plain file I/O on the image."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def pattern(tag: int, length: int) -> bytes:
    """Tagged data: every 8 bytes say which write (tag) and which offset they came from."""
    return b"".join((tag << 40 | i).to_bytes(8, "little") for i in range(0, length, 8))[:length]


async def wait_backend(xs: XenstoreClient, device: DeviceId, *states: XenbusState) -> XenbusState:
    """Wait until the backend's state is one of `states` (a watch, never a sleep)."""
    async with xs.watch(f"{device.backend}/state") as events:
        async for _ in events:
            state = await read_state(xs, device.backend)
            if state in states:
                return state
    raise AssertionError("watch ended")


@dataclass
class Queue:
    ring: FrontRing
    channel: EventChannel
    buffer: Page
    refs: list[int]
    responses: dict[int, BlkifResponse] = field(default_factory=dict)


class MiniFront:
    """A frontend reduced to the protocol: rings, keys, raw requests, data pages."""

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        *,
        order: int = 0,
        queues: int = 1,
        persistent: bool = False,
        protocol: BlkifProtocol = BLKIF_NATIVE,
        npages: int = 300,
    ) -> None:
        self.dom = dom
        self.xs = xs
        self.device = device
        self.be = device.backend_domid
        self.order = order
        self.nqueues = queues
        self.persistent = persistent
        self.protocol = protocol
        self.pages = dom.alloc_pages(npages)
        self.grefs = [dom.grants.grant_access(self.be, p.frame) for p in self.pages]
        self.queues: list[Queue] = []
        self.backend_keys: dict[str, str | None] = {}
        self._next_id = 1

    async def setup(self, extra: dict[str, str | int] | None = None) -> None:
        """Allocate and publish the rings once the backend is in InitWait → Initialised."""
        await wait_backend(self.xs, self.device, InitWait)
        keys: dict[str, str | int | bytes] = {}
        self.queues = []
        for q in range(self.nqueues):
            buf = self.dom.alloc_buffer(1 << self.order)
            refs = [self.dom.grants.grant_access(self.be, f) for f in buf.frames()]
            ring = FrontRing(buf, self.protocol.ring_layout)
            channel = await self.dom.alloc_unbound(self.be)
            prefix = "" if self.nqueues == 1 else f"queue-{q}/"
            if self.order:
                for i, ref in enumerate(refs):
                    keys[f"{prefix}ring-ref{i}"] = ref
            else:
                keys[f"{prefix}ring-ref"] = refs[0]
            keys[f"{prefix}event-channel"] = channel.port
            self.queues.append(Queue(ring, channel, buf, refs))
        if self.order:
            keys["ring-page-order"] = self.order
        if self.nqueues > 1:
            keys["multi-queue-num-queues"] = self.nqueues
        keys["protocol"] = self.protocol.name
        keys["feature-persistent"] = int(self.persistent)
        keys.update(extra or {})
        await publish(self.xs, self.device.frontend, keys, state=Initialised)

    async def connect(self) -> dict[str, str | None]:
        state = await wait_backend(self.xs, self.device, Connected, Closing, Closed)
        assert state == Connected, f"backend went {state.short}"
        self.backend_keys = await read_keys(self.xs, self.device.backend, BACKEND_KEYS)
        await publish(self.xs, self.device.frontend, {}, state=Connected)
        return self.backend_keys

    async def start(self) -> dict[str, str | None]:
        await self.setup()
        return await self.connect()

    # -- requests ------------------------------------------------------------------------------

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def segments(self, first_page: int, length: int) -> tuple[BlkifSegment, ...]:
        """Segments covering `length` bytes (whole 512-byte sectors) from page `first_page`."""
        segs = []
        page = first_page
        while length > 0:
            n = min(length, 4096)
            segs.append(BlkifSegment(self.grefs[page], 0, n // 512 - 1))
            length -= n
            page += 1
        return tuple(segs)

    def put_data(self, first_page: int, data: bytes) -> None:
        for i in range(0, len(data), 4096):
            page = self.pages[first_page + i // 4096]
            chunk = data[i : i + 4096]
            page.view[: len(chunk)] = chunk
            page.written(0, len(chunk))

    def get_data(self, first_page: int, length: int) -> bytes:
        return b"".join(
            bytes(self.pages[first_page + i // 4096].view[: min(4096, length - i)])
            for i in range(0, length, 4096)
        )

    async def run(
        self,
        requests: Sequence[BlkifRequest | BlkifDiscardRequest | BlkifIndirectRequest | bytes],
        queue: int = 0,
    ) -> list[BlkifResponse]:
        """Push every request at once (queue depth = len(requests)); their responses, in
        request order."""
        q = self.queues[queue]
        ids = []
        for request in requests:
            if isinstance(request, bytes):
                data = request  # a raw slot (native layout: id at offset 8)
                ids.append(int.from_bytes(data[8:16], "little"))
            else:
                data = self.protocol.encode_request(request)
                ids.append(request.id)
            q.ring.put_request(data)
        if q.ring.push_requests():
            q.channel.notify()
        while not all(i in q.responses for i in ids):
            while (raw := q.ring.take_response()) is not None:
                response = self.protocol.decode_response(raw)
                q.responses[response.id] = response
            if all(i in q.responses for i in ids):
                break
            if not q.ring.final_check_for_responses():
                await q.channel.wait()
        return [q.responses.pop(i) for i in ids]

    async def one(self, request: BlkifRequest | BlkifDiscardRequest | BlkifIndirectRequest) -> int:
        (response,) = await self.run([request])
        assert response.id == request.id
        return response.status

    async def write(self, offset: int, data: bytes, *, page: int = 0, queue: int = 0) -> int:
        """Write with direct requests of up to 11 segments each; the worst status."""
        self.put_data(page, data)
        requests = []
        for start in range(0, len(data), 11 * 4096):
            n = min(11 * 4096, len(data) - start)
            segs = self.segments(page + start // 4096, n)
            requests.append(
                BlkifRequest(BLKIF_OP_WRITE, self.next_id(), (offset + start) // 512, segs)
            )
        responses = await self.run(requests, queue)
        return min(r.status for r in responses)

    async def read(self, offset: int, length: int, *, page: int = 0, queue: int = 0) -> bytes:
        requests = []
        for start in range(0, length, 11 * 4096):
            n = min(11 * 4096, length - start)
            segs = self.segments(page + start // 4096, n)
            requests.append(
                BlkifRequest(BLKIF_OP_READ, self.next_id(), (offset + start) // 512, segs)
            )
        responses = await self.run(requests, queue)
        assert all(r.status == BLKIF_RSP_OKAY for r in responses), responses
        return self.get_data(page, length)


BACKEND_KEYS = [
    "feature-max-indirect-segments",
    "multi-queue-max-queues",
    "max-ring-page-order",
    "feature-persistent",
    "feature-flush-cache",
    "feature-barrier",
    "feature-discard",
    "discard-granularity",
    "discard-alignment",
    "discard-secure",
    "sectors",
    "info",
    "sector-size",
    "physical-sector-size",
]


@asynccontextmanager
async def backend(
    xs: XenstoreClient,
    dom: Domain,
    device: DeviceId,
    open_storage: Callable[[BackendConfig], Storage] | None = None,
) -> AsyncIterator[BlkbackDevice]:
    """Serve `device` in a task (on the disk `open_storage` makes, if given); cancelled on exit."""
    dev = BlkbackDevice(dom, xs, device, open_storage=open_storage)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(dev.run)
        yield dev
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def setup(
    xenstored: Xenstored,
    workdir: Path,
    transport: str,
    config: VbdConfig,
    domids: tuple[int, ...] = (0, 1),
) -> AsyncIterator[tuple[XenstoreClient, list[Domain]]]:
    async with (
        connect(xenstored.unix) as xs,
        domains(workdir, transport, "unix", domids) as doms,
    ):
        for fe in domids[1:]:
            await create_vbd(xs, vbd(fe), config)
        yield xs, doms


@dataclass
class Served:
    """Domains 0 and 1, xenstore, vbd(1), and the blkback device serving it."""

    xs: XenstoreClient
    dom0: Domain
    dom1: Domain
    device: DeviceId
    dev: BlkbackDevice


@asynccontextmanager
async def served(
    xenstored: Xenstored,
    workdir: Path,
    transport: str,
    config: VbdConfig,
    open_storage: Callable[[BackendConfig], Storage] | None = None,
) -> AsyncIterator[Served]:
    """`setup` with domains 0 and 1, and blkback serving vbd(1) (on the disk `open_storage`
    makes, if given) until the block ends; the test brings the frontend (`MiniFront`)."""
    async with setup(xenstored, workdir, transport, config) as (xs, (dom0, dom1)):
        device = vbd(1)
        async with backend(xs, dom0, device, open_storage) as dev:
            yield Served(xs, dom0, dom1, device, dev)


@asynccontextmanager
async def front_on_ram_disk(
    xenstored: Xenstored,
    workdir: Path,
    transport: str,
    disk: Callable[[int], Storage],
    *,
    persistent: bool = False,
) -> AsyncIterator[MiniFront]:
    """`served` on the 1 MiB RAM disk `disk(size)` makes, with a started `MiniFront`."""
    async with served(
        xenstored,
        workdir,
        transport,
        VbdConfig(None, MiB),
        open_storage=lambda c: disk(c.size or 0),
    ) as s:
        front = MiniFront(s.dom1, s.xs, s.device, persistent=persistent)
        await front.start()
        yield front


pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)


async def test_handshake_keys_and_io(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    image = xs_workdir / "disk.img"
    with trio.fail_after(30):
        async with setup(xenstored, xs_workdir, transport, VbdConfig(str(image), 4 * MiB)) as (
            xs,
            (dom0, dom1),
        ):
            device = vbd(1)
            async with backend(xs, dom0, device) as dev:
                front = MiniFront(dom1, xs, device)
                await wait_backend(xs, device, InitWait)
                advertised = await read_keys(xs, device.backend, BACKEND_KEYS[:4])
                assert advertised == {
                    "feature-max-indirect-segments": "256",
                    "multi-queue-max-queues": "4",
                    "max-ring-page-order": "4",
                    "feature-persistent": "1",
                }
                keys = await front.start()
                assert keys["sectors"] == str(4 * MiB // 512)
                assert keys["info"] == "0"
                assert keys["sector-size"] == "512"
                assert keys["physical-sector-size"] in ("512", "4096")  # the file system's
                assert keys["feature-flush-cache"] == keys["feature-barrier"] == "1"
                assert keys["feature-discard"] == "1"
                assert int(keys["discard-granularity"] or 0) % 512 == 0
                assert keys["discard-alignment"] == "0"
                assert image.stat().st_size == 4 * MiB  # created sparse at xenpv-size
                assert image.stat().st_blocks == 0

                data = pattern(1, 20 * 4096)
                assert await front.write(12288, data) == BLKIF_RSP_OKAY
                assert await front.read(12288, len(data), page=100) == data
                assert read_image(image, 12288, len(data)) == data
                # a partial-frame segment: sectors 3..5 of a page
                front.put_data(0, b"\xaa" * 4096)
                seg = BlkifSegment(front.grefs[0], 3, 5)
                request = BlkifRequest(BLKIF_OP_WRITE, front.next_id(), 7, (seg,))
                assert await front.one(request) == BLKIF_RSP_OKAY
                assert read_image(image, 7 * 512, 3 * 512) == b"\xaa" * 1536
                assert dev.connections == 1
            # the device outlives a cancelled backend task: then the toolstack removes it
            await destroy_device(xs, device)


async def test_flush_barrier_discard(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    image = xs_workdir / "disk.img"
    with trio.fail_after(30):
        async with served(xenstored, xs_workdir, transport, VbdConfig(str(image), 4 * MiB)) as s:
            front = MiniFront(s.dom1, s.xs, s.device)
            await front.start()
            data = pattern(2, 64 * 1024)
            assert await front.write(0, data) == BLKIF_RSP_OKAY
            flush = BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, front.next_id())
            assert await front.one(flush) == BLKIF_RSP_OKAY
            # a barrier with data, behind a queue of writes
            front.put_data(50, pattern(3, 8192))
            writes: list[BlkifRequest] = [
                BlkifRequest(BLKIF_OP_WRITE, front.next_id(), 256 + 8 * i, front.segments(i, 4096))
                for i in range(8)
            ]
            barrier = BlkifRequest(
                BLKIF_OP_WRITE_BARRIER, front.next_id(), 1024, front.segments(50, 8192)
            )
            responses = await front.run([*writes, barrier])
            assert [r.status for r in responses] == [BLKIF_RSP_OKAY] * 9
            assert responses[-1].operation == BLKIF_OP_WRITE_BARRIER
            assert read_image(image, 1024 * 512, 8192) == pattern(3, 8192)
            # discard: punched, reads back as zeroes; the secure flag is honoured or ignored
            discard = BlkifDiscardRequest(front.next_id(), 8, 64, flag=1)
            assert await front.one(discard) == BLKIF_RSP_OKAY
            got = await front.read(0, 64 * 1024, page=100)
            assert got[4096 : 4096 + 32768] == bytes(32768)
            assert got[:4096] == data[:4096] and got[36864:] == data[36864:]
            beyond = BlkifDiscardRequest(front.next_id(), 8192 - 8, 16)
            assert await front.one(beyond) == BLKIF_RSP_ERROR


async def test_features_switched_off(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(30):
        async with setup(
            xenstored, xs_workdir, transport, VbdConfig(None, MiB, features=FEATURES_OFF)
        ) as (
            xs,
            (dom0, dom1),
        ):
            device = vbd(1)
            async with backend(xs, dom0, device):
                front = MiniFront(dom1, xs, device)
                keys = await front.start()
                assert keys["feature-max-indirect-segments"] is None  # blkif.h: not created
                assert keys["max-ring-page-order"] == "0"
                assert keys["multi-queue-max-queues"] == "1"
                for name in ("feature-persistent", "feature-flush-cache", "feature-barrier"):
                    assert keys[name] == "0", name
                assert keys["feature-discard"] == "0"
                statuses = [
                    await front.one(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, front.next_id())),
                    await front.one(BlkifRequest(BLKIF_OP_WRITE_BARRIER, front.next_id())),
                    await front.one(BlkifDiscardRequest(front.next_id(), 0, 8)),
                    await front.one(
                        BlkifIndirectRequest(
                            BLKIF_OP_READ, front.next_id(), 0, 12, (front.grefs[0],)
                        )
                    ),
                ]
                assert statuses == [BLKIF_RSP_EOPNOTSUPP] * 4
                assert await front.write(0, pattern(4, 8192)) == BLKIF_RSP_OKAY
                assert await front.read(0, 8192, page=10) == pattern(4, 8192)

            # a frontend asking for more than was offered: xenbus_dev_fatal → Closing
            await destroy_device(xs, device)
            await create_vbd(xs, device, VbdConfig(None, MiB, features=FEATURES_OFF))
            async with backend(xs, dom0, device):
                greedy = MiniFront(dom1, xs, device, order=1)
                await greedy.setup()
                assert await wait_backend(xs, device, Connected, Closing) == Closing


async def test_multiqueue_ring_order_persistent_indirect(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(40):
        async with served(xenstored, xs_workdir, transport, VbdConfig(None, 8 * MiB)) as s:
            front = MiniFront(s.dom1, s.xs, s.device, order=2, queues=4, persistent=True)
            keys = await front.start()
            assert keys["feature-persistent"] == "1"
            assert all(q.ring.nr_ents == 128 for q in front.queues)
            for q in range(4):  # each queue, a 40 KiB direct write at queue depth 2
                data = pattern(10 + q, 40960)
                assert await front.write(q * MiB, data, page=q * 10, queue=q) == 0
                assert await front.read(q * MiB, 40960, page=200, queue=q) == data
            conn = s.dev.connection
            assert conn is not None and all(len(g) > 0 for g in conn.grants)
            # one indirect request of 256 segments (1 MiB), written then read back
            data = pattern(20, MiB)
            front.put_data(0, data[: 256 * 4096])
            pages = encode_indirect_pages(front.segments(0, MiB))
            indirect = s.dom1.alloc_pages(1)[0]
            indirect.view[:4096] = pages[0]
            indirect.written(0, 4096)
            iref = s.dom1.grants.grant_access(0, indirect.frame, readonly=True)
            write = BlkifIndirectRequest(BLKIF_OP_WRITE, front.next_id(), 4096, 256, (iref,))
            (response,) = await front.run([write], queue=1)
            assert (response.status, response.operation) == (BLKIF_RSP_OKAY, BLKIF_OP_WRITE)
            for p in range(256):
                front.pages[p].view[:4096] = bytes(4096)
                front.pages[p].written(0, 4096)
            read = BlkifIndirectRequest(BLKIF_OP_READ, front.next_id(), 4096, 256, (iref,))
            assert await front.one(read) == BLKIF_RSP_OKAY
            assert front.get_data(0, MiB) == data
            storage = s.dev.storage
            assert storage is not None
            assert await storage.read(4096 * 512, MiB) == data  # the independent reader
            too_many = BlkifIndirectRequest(BLKIF_OP_READ, front.next_id(), 0, 257, (iref,))
            assert await front.one(too_many) == BLKIF_RSP_ERROR


async def test_read_only_large_sectors_and_resize(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    image = xs_workdir / "ro.img"
    image.write_bytes(pattern(30, 64 * 1024))
    os.truncate(image, 2 * MiB)
    with trio.fail_after(30):
        async with setup(
            xenstored,
            xs_workdir,
            transport,
            VbdConfig(str(image), 2 * MiB, read_only=True, sector_size=4096),
        ) as (xs, (dom0, dom1)):
            device = vbd(1)
            async with backend(xs, dom0, device):
                front = MiniFront(dom1, xs, device)
                keys = await front.start()
                assert keys["info"] == "4"  # VDISK_READONLY
                assert keys["sector-size"] == "4096"
                assert keys["sectors"] == str(2 * MiB // 512)  # always 512-byte units
                assert keys["feature-flush-cache"] == keys["feature-discard"] == "0"
                assert await front.read(0, 65536) == pattern(30, 65536)
                assert await front.write(0, b"x" * 4096) == BLKIF_RSP_ERROR
                misaligned = BlkifRequest(
                    BLKIF_OP_READ, front.next_id(), 1, front.segments(0, 4096)
                )
                assert await front.one(misaligned) == BLKIF_RSP_ERROR
                short = BlkifRequest(
                    BLKIF_OP_READ, front.next_id(), 8, (BlkifSegment(front.grefs[0], 0, 3),)
                )
                assert await front.one(short) == BLKIF_RSP_ERROR
            assert read_image(image, 0, 65536) == pattern(30, 65536)  # untouched

            # capacity change on a writable memory disk: sectors re-written with Connected
            device2 = vbd(1, 51728)
            await create_vbd(xs, device2, VbdConfig(None, MiB))
            async with backend(xs, dom0, device2) as dev:
                front = MiniFront(dom1, xs, device2)
                await front.start()
                last = BlkifRequest(
                    BLKIF_OP_WRITE, front.next_id(), 2 * MiB // 512 - 8, front.segments(0, 4096)
                )
                assert await front.one(last) == BLKIF_RSP_ERROR  # beyond 1 MiB
                async with xs.watch(f"{device2.backend}/sectors") as events:
                    await xs.write(f"{device2.backend}/xenpv-size", str(2 * MiB))
                    async for _ in events:
                        if (await xs.try_read(f"{device2.backend}/sectors")) == b"4096":
                            break
                assert await read_state(xs, device2.backend) == Connected
                assert await front.one(last) == BLKIF_RSP_OKAY
                await dev.resize(3 * MiB)
                assert await xs.try_read(f"{device2.backend}/sectors") == b"6144"


async def test_backend_restart_and_removal(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    image = xs_workdir / "disk.img"
    with trio.fail_after(30):
        async with setup(xenstored, xs_workdir, transport, VbdConfig(str(image), MiB)) as (
            xs,
            (dom0, dom1),
        ):
            device = vbd(1)
            async with backend(xs, dom0, device):
                front = MiniFront(dom1, xs, device)
                await front.start()
                assert await front.write(0, pattern(40, 8192)) == BLKIF_RSP_OKAY
            # a new backend finds a Connected frontend with rings it knows nothing of: Closed
            async with trio.open_nursery() as nursery:
                dev = BlkbackDevice(dom0, xs, device)
                returned = trio.Event()

                async def run_backend() -> None:
                    await dev.run()
                    returned.set()

                nursery.start_soon(run_backend)
                assert await wait_backend(xs, device, Closed) == Closed
                # the frontend starts over (Closed, then Initialising): reconnect, data kept
                await publish(xs, device.frontend, {}, state=Closed)
                await publish(xs, device.frontend, {}, state=XenbusState.XenbusStateInitialising)
                front = MiniFront(dom1, xs, device)
                await front.start()
                assert await front.read(0, 8192) == pattern(40, 8192)
                # the toolstack removes the device: run() returns by itself
                await destroy_device(xs, device)
                await returned.wait()
                assert dev.storage is None and dev.connection is None


class Gate:
    """A storage fault plan that holds the I/O at offset 0 until released."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.release = trio.Event()

    async def before(self, op: StorageOp, offset: int, length: int) -> None:
        if op in (StorageOp.READ, StorageOp.WRITE) and offset == 0 and length:
            self.started.set()
            await self.release.wait()


async def arrivals(front: MiniFront, count: int) -> list[int]:
    """The ids of the next `count` responses, in the order the backend produced them."""
    q = front.queues[0]
    got: list[int] = []
    while len(got) < count:
        while (raw := q.ring.take_response()) is not None:
            got.append(front.protocol.decode_response(raw).id)
        if len(got) < count and not q.ring.final_check_for_responses():
            await q.channel.wait()
    return got


def push(front: MiniFront, *requests: BlkifRequest) -> None:
    q = front.queues[0]
    for request in requests:
        q.ring.put_request(front.protocol.encode_request(request))
    if q.ring.push_requests():
        q.channel.notify()


async def test_out_of_order_completion_and_barrier_drain(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    gate = Gate()
    with trio.fail_after(30):
        async with front_on_ram_disk(
            xenstored, xs_workdir, transport, lambda size: MemoryDisk(size, faults=gate)
        ) as front:
            slow = BlkifRequest(BLKIF_OP_READ, 1001, 0, front.segments(0, 4096))
            fast = BlkifRequest(BLKIF_OP_READ, 1002, 8, front.segments(1, 4096))
            push(front, slow, fast)
            assert await arrivals(front, 1) == [1002]  # overtakes the held read
            gate.release.set()
            assert await arrivals(front, 1) == [1001]

            # A barrier waits for the writes before it, and the reads after it wait too.
            gate.release = trio.Event()
            gate.started = trio.Event()
            write = BlkifRequest(BLKIF_OP_WRITE, 2001, 0, front.segments(2, 4096))
            barrier = BlkifRequest(BLKIF_OP_WRITE_BARRIER, 2002)
            read = BlkifRequest(BLKIF_OP_READ, 2003, 8, front.segments(3, 4096))
            push(front, write, barrier, read)
            await gate.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            gate.release.set()
            assert await arrivals(front, 3) == [2001, 2002, 2003]


async def test_close_reconnect_releases_grants(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(30):
        async with served(xenstored, xs_workdir, transport, VbdConfig(None, MiB)) as s:
            front = MiniFront(s.dom1, s.xs, s.device, persistent=True, npages=40, order=1)
            await front.start()
            assert await front.write(0, pattern(50, 16 * 4096)) == BLKIF_RSP_OKAY
            conn = s.dev.connection
            assert conn is not None and len(conn.grants[0]) == 16
            # Linux order: frontend Closing → backend Closing; frontend Closed → Closed
            await publish(s.xs, s.device.frontend, {}, state=Closing)
            assert await wait_backend(s.xs, s.device, Closing) == Closing
            await publish(s.xs, s.device.frontend, {}, state=Closed)
            assert await wait_backend(s.xs, s.device, Closed) == Closed
            assert s.dev.connection is None
            # nothing stays mapped: every grant (data and ring pages) can be revoked
            for gref in front.grefs + front.queues[0].refs:
                s.dom1.grants.end_access(gref)
            # reconnect (the x86_32 ABI this time): the memory disk kept its data
            await publish(s.xs, s.device.frontend, {}, state=XenbusState.XenbusStateInitialising)
            again = MiniFront(s.dom1, s.xs, s.device, protocol=BLKIF_X86_32, npages=40, order=1)
            await again.start()
            assert s.dev.connections == 2
            assert await again.read(0, 16 * 4096) == pattern(50, 16 * 4096)
            assert await again.write(4096, pattern(51, 8192), page=20) == BLKIF_RSP_OKAY
            assert await again.read(4096, 8192, page=30) == pattern(51, 8192)


async def test_persistent_grants_leave_maptrack_for_other_devices(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """Persistent grants of all devices use at most half the backend's maptrack."""
    with trio.fail_after(30):
        async with (
            connect(xenstored.unix) as xs,
            domains(xs_workdir, transport, "unix", (0, 1, 2), max_maps=96) as (dom0, dom1, dom2),
        ):
            for fe in (1, 2):
                await create_vbd(xs, vbd(fe), VbdConfig(None, MiB))
            async with backend(xs, dom0, vbd(1)) as dev1, backend(xs, dom0, vbd(2)):
                greedy = MiniFront(dom1, xs, vbd(1), persistent=True, npages=120)
                await greedy.start()
                data = pattern(60, 110 * 4096)
                assert await greedy.write(0, data) == BLKIF_RSP_OKAY  # 110 grants offered
                assert await greedy.read(0, len(data), page=0) == data
                conn = dev1.connection
                assert conn is not None and len(conn.grants[0]) == 48  # half of 96
                other = MiniFront(dom2, xs, vbd(2), persistent=True, order=2, npages=8)
                await other.start()  # its 4 ring pages still map
                assert await other.write(0, pattern(61, 8192)) == BLKIF_RSP_OKAY
                assert await other.read(0, 8192, page=4) == pattern(61, 8192)


async def test_xenstored_restart_while_serving(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """xenstored dies and comes back (kill -9, journal replay): the rings never noticed, and the
    next close/reconnect handshake runs on the restored store."""
    with trio.fail_after(40):
        async with served(xenstored, xs_workdir, transport, VbdConfig(None, MiB)) as s:
            front = MiniFront(s.dom1, s.xs, s.device)
            await front.start()
            assert await front.write(0, pattern(70, 8192)) == BLKIF_RSP_OKAY
            xenstored.kill()
            assert await front.read(0, 8192) == pattern(70, 8192)  # no xenstore needed
            await trio.to_thread.run_sync(xenstored.start)
            await publish(s.xs, s.device.frontend, {}, state=Closed)
            assert await wait_backend(s.xs, s.device, Closed) == Closed
            await publish(s.xs, s.device.frontend, {}, state=XenbusState.XenbusStateInitialising)
            again = MiniFront(s.dom1, s.xs, s.device, npages=8)
            await again.start()
            assert s.dev.connections == 2
            assert await again.read(0, 8192) == pattern(70, 8192)


class Failing:
    """A storage fault plan: reads at offset 0 fail with an I/O error, discards are refused
    as unsupported."""

    async def before(self, op: StorageOp, offset: int, length: int) -> None:
        if op is StorageOp.READ and offset == 0:
            raise StorageError(StorageErrorKind.IO, "media error")
        if op is StorageOp.DISCARD:
            raise StorageError(StorageErrorKind.UNSUPPORTED, "no hole punching here")


async def test_storage_errors_become_status_codes(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(30):
        async with front_on_ram_disk(
            xenstored, xs_workdir, transport, lambda size: MemoryDisk(size, faults=Failing())
        ) as front:
            bad = BlkifRequest(BLKIF_OP_READ, front.next_id(), 0, front.segments(0, 4096))
            good = BlkifRequest(BLKIF_OP_READ, front.next_id(), 8, front.segments(1, 4096))
            discard = BlkifDiscardRequest(front.next_id(), 0, 8)
            statuses = [r.status for r in await front.run([bad, good, discard])]
            assert statuses == [BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_RSP_EOPNOTSUPP]


class FailingNow(MemoryDisk):
    """A RAM disk whose in-task calls (the ring loop's path) fail by offset, while the async
    calls work: reads at 0 fail with an I/O error, reads at 4096 hit a bug, writes at 12288
    are unsupported."""

    def readinto_now(self, offset: int, buffers: Sequence[ReadBuffer]) -> bool:
        if offset == 0:
            raise StorageError(StorageErrorKind.IO, "media error")
        if offset == 4096:
            raise RuntimeError("a bug in the disk")
        return super().readinto_now(offset, buffers)

    def write_now(self, offset: int, buffers: Sequence[WriteBuffer]) -> bool:
        if offset == 12288:
            raise StorageError(StorageErrorKind.UNSUPPORTED, "not here")
        return super().write_now(offset, buffers)


async def test_requests_served_in_the_ring_loop_answer_storage_errors(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """Requests on cached persistent grants are served inside the ring loop; what the disk
    raises there becomes a status code as on the task path, and the ring keeps going."""
    with trio.fail_after(30):
        async with front_on_ram_disk(
            xenstored, xs_workdir, transport, FailingNow, persistent=True
        ) as front:

            def requests() -> list[BlkifRequest]:
                return [
                    BlkifRequest(BLKIF_OP_READ, front.next_id(), 0, front.segments(0, 4096)),
                    BlkifRequest(BLKIF_OP_READ, front.next_id(), 8, front.segments(1, 4096)),
                    BlkifRequest(BLKIF_OP_READ, front.next_id(), 16, front.segments(2, 4096)),
                    BlkifRequest(BLKIF_OP_WRITE, front.next_id(), 24, front.segments(3, 4096)),
                ]

            # first use of each grant: mapped on the task path, whose async calls work
            statuses = [r.status for r in await front.run(requests())]
            assert statuses == [BLKIF_RSP_OKAY] * 4
            # now cached: served in the loop, where the disk fails
            statuses = [r.status for r in await front.run(requests())]
            assert statuses == [
                BLKIF_RSP_ERROR,
                BLKIF_RSP_ERROR,
                BLKIF_RSP_OKAY,
                BLKIF_RSP_EOPNOTSUPP,
            ]
            statuses = [r.status for r in await front.run(requests()[2:3])]
            assert statuses == [BLKIF_RSP_OKAY]  # the ring still serves
