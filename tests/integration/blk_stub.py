"""A deliberately small blkif backend for blkfront tests (not blkback: no validation beyond
the codec, grant copy for every segment). It lets the frontend's tests run on any feature
combination independently of the real backend, and misbehave on request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trio

from xenpv.abi.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifResponse,
    BlkifSegment,
    blkif_protocol,
    decode_indirect_pages,
)
from xenpv.abi.errors import RingError
from xenpv.abi.ring import BackRing
from xenpv.hv import CopyDirection, CopyOp, Domain, EventChannel, GrantMapping
from xenpv.hv.errors import HvError
from xenpv.xenbus.core import Action, DeviceId
from xenpv.xenbus.handshake import KeyValues, read_keys
from xenpv.xenstore.client import XenstoreClient


@dataclass
class StubBackend:
    dom: Domain
    xs: XenstoreClient
    device: DeviceId
    disk: bytearray
    order: int = 4
    queues: int = 4
    indirect: int = 256
    persistent: bool = True
    sector_size: int = 512
    bogus_id: bool = False  # answer the first request with an id nobody issued
    bad_sectors: bool = False  # publish garbage `sectors` on the first connect
    role: Literal["frontend", "backend"] = "backend"
    served: int = 0
    _scope: trio.CancelScope | None = None
    _maps: list[GrantMapping] = field(default_factory=list)
    _channels: list[EventChannel] = field(default_factory=list)
    nursery: trio.Nursery | None = None

    async def perform(self, action: Action) -> KeyValues | None:
        if action in (Action.ADVERTISE, Action.RESET, Action.CLOSE):
            await self._stop()
            if action is Action.CLOSE:
                return {}
            return {
                "max-ring-page-order": self.order,
                "multi-queue-max-queues": self.queues,
                "feature-max-indirect-segments": self.indirect,
            }
        if action is Action.CONNECT:
            return await self._connect()
        return {}

    async def _stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        for mapping in self._maps:
            await mapping.unmap()
        for channel in self._channels:
            channel.close()
        self._maps, self._channels = [], []

    async def _connect(self) -> KeyValues:
        fe = self.device.frontend
        top = await read_keys(
            self.xs, fe, ["multi-queue-num-queues", "ring-page-order", "protocol"]
        )
        nq = int(top["multi-queue-num-queues"] or 1)
        order = int(top["ring-page-order"] or 0)
        proto = blkif_protocol(top["protocol"])
        rings = []
        for q in range(nq):
            prefix = f"{fe}/queue-{q}" if nq > 1 else fe
            names = ["ring-ref"] if order == 0 else [f"ring-ref{i}" for i in range(1 << order)]
            keys = await read_keys(self.xs, prefix, [*names, "event-channel"])
            mapping = await self.dom.map_grants(
                self.device.frontend_domid, [int(keys[n] or -1) for n in names]
            )
            self._maps.append(mapping)
            channel = await self.dom.bind_interdomain(
                self.device.frontend_domid, int(keys["event-channel"] or -1)
            )
            self._channels.append(channel)
            rings.append((BackRing(mapping, proto.ring_layout), channel))
        self._scope = scope = trio.CancelScope()
        assert self.nursery is not None

        async def serve_all() -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    for ring, channel in rings:
                        inner.start_soon(self._serve, ring, channel, proto)

        self.nursery.start_soon(serve_all)
        sectors: str | int = len(self.disk) // 512
        if self.bad_sectors:
            sectors, self.bad_sectors = "lots", False
        return {
            "sectors": sectors,
            "info": 0,
            "sector-size": self.sector_size,
            "physical-sector-size": self.sector_size,
            "feature-flush-cache": 1,
            "feature-discard": 1,
            "feature-persistent": int(self.persistent),
        }

    async def _serve(self, ring: BackRing, channel: EventChannel, proto: BlkifProtocol) -> None:
        fe = self.device.frontend_domid
        if True:
            try:
                while True:
                    while (raw := ring.take_request()) is not None:
                        req = proto.decode_request(raw, max_indirect_segments=self.indirect)
                        segs: tuple[BlkifSegment, ...]
                        op: int
                        if isinstance(req, BlkifDiscardRequest):
                            at = req.sector_number * 512
                            self.disk[at : at + req.nr_sectors * 512] = bytes(req.nr_sectors * 512)
                            segs, op = (), BLKIF_OP_DISCARD
                        elif isinstance(req, BlkifIndirectRequest):
                            pages = []
                            for gref in req.indirect_grefs:
                                buf = bytearray(4096)
                                await self.dom.grant_copy(
                                    [
                                        CopyOp(
                                            CopyDirection.FROM_REMOTE,
                                            fe,
                                            gref,
                                            0,
                                            4096,
                                            memoryview(buf),
                                        )
                                    ]
                                )
                                pages.append(bytes(buf))
                            segs, op = decode_indirect_pages(pages, req), req.indirect_op
                        else:
                            segs, op = req.segments, req.operation
                        ops = []
                        position = req.sector_number * 512
                        view = memoryview(self.disk)
                        for seg in segs:
                            n = seg.nr_sectors * 512
                            direction = (
                                CopyDirection.TO_REMOTE
                                if op == BLKIF_OP_READ
                                else CopyDirection.FROM_REMOTE
                            )
                            ops.append(
                                CopyOp(
                                    direction,
                                    fe,
                                    seg.gref,
                                    seg.first_sect * 512,
                                    n,
                                    view[position : position + n],
                                )
                            )
                            position += n
                        status = 0
                        if ops and op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                            statuses = await self.dom.grant_copy(ops)
                            status = 0 if all(s == 0 for s in statuses) else -1
                        rid = req.id + 1000 if self.bogus_id else req.id
                        self.bogus_id = False
                        ring.put_response(
                            proto.encode_response(BlkifResponse(rid, req.operation, status))
                        )
                        self.served += 1
                    if ring.push_responses():
                        channel.notify()
                    if ring.final_check_for_requests():
                        continue
                    await channel.wait()
            except HvError:
                return
            except RingError:
                # `_stop` cancels us and unmaps the ring; an event that woke us just before
                # lets this task read the unmapped (zeroed) ring once before the
                # cancellation lands: a stopped stub, not a bogus frontend.
                if getattr(ring.buffer, "dead", False):
                    return
                raise
