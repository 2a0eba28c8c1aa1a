"""Grant granules in the block drivers (docs/granule-extension.md), sans-IO.

Both ends' xenstore rules (blkfront `keys`, blkback `keys`): every mix of old and
new ends, orders above the backend's maximum, and a property that whatever the frontend
writes the backend accepts with the same order and the same ring grants. Then the blkfront
engine against an in-memory granule-aware backend: segments per granule, sector ranges
inside the granule, indirect pages as granules, persistent grants as granules.
"""

from __future__ import annotations

import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.blkback.keys import (
    BackendConfig,
    NegotiationError,
    connect_keys,
    device_features,
    parse_frontend,
)
from backends.blkback.keys import advertise_keys as backend_advertise
from backends.storage import StorageInfo
from frontends.blkfront import keys as fe
from frontends.blkfront.core import BlkIo, Engine, Negotiated
from frontends.blkfront.errors import BlkfrontProtocolError
from xenpv import granule
from xenpv.abi.blkif import (
    BLKIF_ARM,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_OKAY,
    BlkifIndirectRequest,
    BlkifRequest,
    BlkifResponse,
    decode_indirect_pages,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.hv.grant import GrantTable
from xenpv.hv.memory import DomainMemory, Page

GUEST, BACKEND = 1, 0


def as_str(keys: dict[str, object]) -> dict[str, str | None]:
    return {k: str(v) for k, v in keys.items()}


def frontend_keys(geo: fe.Geometry, wishes: fe.Wishes) -> dict[str, str | None]:
    """What blkfront publishes with Initialised (fake grefs and ports)."""
    grefs = [[100 * q + i for i in range(geo.ring_refs)] for q in range(geo.queues)]
    return as_str(dict(fe.setup_keys(geo, grefs, [7 + q for q in range(geo.queues)], wishes)))


def storage_info() -> StorageInfo:
    return StorageInfo(1 << 20, 512, 512, False, True, True, 4096, 0, False)


# -- negotiation: the mixes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("page", "backend_max", "cap", "order", "ring_order", "ring_keys", "key"),
    [
        # new frontend, old backend (no key): baseline, no key written
        (65536, None, None, 0, 0, ["ring-ref"], None),
        # new backend with the extension off (max 0): the frontend states 0
        (65536, 0, None, 0, 0, ["ring-ref"], "0"),
        # 64 KiB guest, backend max 4: one 64 KiB granule is the whole ring
        (65536, 4, None, 4, 4, ["ring-ref"], "4"),
        # the backend's maximum bounds it
        (65536, 2, None, 2, 2, ["ring-ref"], "2"),
        # 16 KiB guest: its page order bounds it
        (16384, 4, None, 2, 2, ["ring-ref"], "2"),
        # a 4 KiB guest never uses more than 4 KiB
        (4096, 4, None, 0, 0, ["ring-ref"], "0"),
        # a frontend that declines
        (65536, 4, 0, 0, 0, ["ring-ref"], "0"),
    ],
)
def test_frontend_choice_and_keys(
    page: int,
    backend_max: int | None,
    cap: int | None,
    order: int,
    ring_order: int,
    ring_keys: list[str],
    key: str | None,
) -> None:
    backend: dict[str, str | None] = {"max-ring-page-order": "0"}
    if backend_max is not None:
        backend[granule.BACKEND_MAX_KEY] = str(backend_max)
    wishes = fe.Wishes(granule_order=cap)
    geo = fe.geometry(wishes, backend, page)
    assert (geo.granule_order, geo.ring_page_order) == (order, ring_order)
    keys = frontend_keys(geo, wishes)
    assert [k for k in keys if k.startswith("ring-ref")] == ring_keys
    assert keys.get(granule.FRONTEND_KEY) == key
    assert ("ring-page-order" in keys) == (ring_order > 0)


def test_multi_granule_ring_uses_numbered_refs() -> None:
    backend = {"max-ring-page-order": "4", granule.BACKEND_MAX_KEY: "2"}
    geo = fe.geometry(fe.Wishes(), backend, 65536)
    assert (geo.granule_order, geo.ring_page_order, geo.ring_refs) == (2, 4, 4)
    keys = frontend_keys(geo, fe.Wishes())
    assert [k for k in keys if k.startswith("ring-ref")] == [f"ring-ref{i}" for i in range(4)]
    params = parse_frontend(keys, BackendConfig(max_granule_order=2))
    assert params.granule_order == 2 and len(params.queues[0].ring_refs) == 4


def test_backend_advertises_its_maximum() -> None:
    assert backend_advertise(BackendConfig())[granule.BACKEND_MAX_KEY] == 4
    assert backend_advertise(BackendConfig(max_granule_order=0))[granule.BACKEND_MAX_KEY] == 0


def test_old_frontend_without_the_key_is_the_baseline() -> None:
    keys = {"ring-ref": "8", "event-channel": "3", "protocol": "arm-abi"}
    params = parse_frontend(keys, BackendConfig())
    assert params.granule_order == 0 and params.queues[0].ring_refs == (8,)
    echoed = connect_keys(storage_info(), device_features(BackendConfig(), storage_info()))
    assert echoed[granule.FRONTEND_KEY] == 0


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        # above the backend's maximum: fatal, never shrunk
        (
            {granule.FRONTEND_KEY: "4", "ring-page-order": "4", "ring-ref": "1"},
            "grant-granule-order 4 exceeds max-grant-granule-order 2",
        ),
        ({granule.FRONTEND_KEY: "x", "ring-ref": "1"}, "reading grant-granule-order: 'x'"),
        ({granule.FRONTEND_KEY: "9", "ring-ref": "1"}, "outside 0..4"),
        # a ring smaller than one granule
        ({granule.FRONTEND_KEY: "2", "ring-ref": "1"}, "a ring is at least one granule"),
        (
            {granule.FRONTEND_KEY: "2", "ring-page-order": "1", "ring-ref0": "1"},
            "smaller than grant-granule-order 2",
        ),
        # ring order above max(max-ring-page-order, granule order)
        (
            {granule.FRONTEND_KEY: "2", "ring-page-order": "3", "ring-ref0": "1"},
            "exceeds max:2",
        ),
        # one granule is named `ring-ref`, not `ring-ref0`
        (
            {granule.FRONTEND_KEY: "2", "ring-page-order": "2", "ring-ref0": "1"},
            "reading ring-ref: missing",
        ),
    ],
)
def test_backend_refuses_what_it_cannot_map(keys: dict[str, str | None], message: str) -> None:
    keys = {"event-channel": "3", "protocol": "arm-abi", **keys}
    config = BackendConfig(max_granule_order=2, max_ring_page_order=0)
    with pytest.raises(NegotiationError, match=message):
        parse_frontend(keys, config)


def test_frontend_checks_the_echo() -> None:
    geo = fe.Geometry(4, 1, 4, True)
    connected = {"sectors": "2048", granule.FRONTEND_KEY: "4"}
    neg = fe.negotiated(fe.Wishes(), geo, connected, handle=1)
    assert (neg.grant_size, neg.granule_order) == (65536, 4)
    assert neg.summary()["grant_size"] == 65536 and neg.summary()["granule_order"] == 4
    with pytest.raises(BlkfrontProtocolError, match="echoes grant-granule-order '2'"):
        fe.negotiated(fe.Wishes(), geo, {**connected, granule.FRONTEND_KEY: "2"}, handle=1)
    # an old backend echoes nothing
    assert (
        fe.negotiated(fe.Wishes(), fe.Geometry(0, 1), {"sectors": "8"}, handle=1).grant_size == 4096
    )


@settings(max_examples=200)
@given(
    page=st.sampled_from([4096, 16384, 65536]),
    backend_max=st.one_of(st.none(), st.integers(0, 4)),
    cap=st.one_of(st.none(), st.integers(0, 4)),
    fe_ring=st.integers(0, 4),
    be_ring=st.one_of(st.none(), st.integers(0, 4)),
    queues=st.integers(1, 4),
)
def test_both_ends_always_agree(
    page: int,
    backend_max: int | None,
    cap: int | None,
    fe_ring: int,
    be_ring: int | None,
    queues: int,
) -> None:
    config = BackendConfig(
        max_granule_order=0 if backend_max is None else backend_max,
        max_ring_page_order=0 if be_ring is None else be_ring,
    )
    advertised = as_str(dict(backend_advertise(config)))
    if backend_max is None:  # an old backend
        del advertised[granule.BACKEND_MAX_KEY]
    if be_ring is None:
        del advertised["max-ring-page-order"]
    wishes = fe.Wishes(max_ring_page_order=fe_ring, max_queues=queues, granule_order=cap)
    geo = fe.geometry(wishes, advertised, page)
    assert geo.granule_order <= min(granule.page_order(page), backend_max or 0)
    keys = frontend_keys(geo, wishes)
    params = parse_frontend(keys, config)  # never refuses what blkfront writes
    assert params.granule_order == geo.granule_order
    assert params.ring_page_order == geo.ring_page_order
    assert all(len(q.ring_refs) == geo.ring_refs for q in params.queues)
    info = storage_info()
    echo = as_str(
        dict(connect_keys(info, device_features(config, info), granule_order=params.granule_order))
    )
    neg = fe.negotiated(wishes, geo, echo, handle=1)
    assert neg.grant_size == granule.granule_size(params.granule_order)


# -- the engine against a granule-aware in-memory backend ----------------------------------


class Backend:
    """Serves one ring from `disk`, reading granules through the guest's grant table."""

    def __init__(
        self, memory: DomainMemory, grants: GrantTable, page: Page, disk: bytearray, gsize: int
    ) -> None:
        self.memory, self.grants, self.disk, self.gsize = memory, grants, disk, gsize
        self.ring = BackRing(page, BLKIF_ARM.ring_layout)
        self.requests: list[tuple[int, int]] = []  # (operation, segments)

    def granule(self, gref: int) -> int:
        status, frame, nframes = self.grants.check(gref, BACKEND, True)
        assert status == 0 and nframes * 4096 == self.gsize, (gref, status, nframes)
        return frame * 4096

    def serve(self) -> int:
        served = 0
        gsize = self.gsize
        while (raw := self.ring.take_request()) is not None:
            req = BLKIF_ARM.decode_request(raw, max_indirect_segments=4096, granule=gsize)
            served += 1
            if isinstance(req, BlkifIndirectRequest):
                pages = [
                    bytes(self.memory.view[self.granule(g) :][:gsize]) for g in req.indirect_grefs
                ]
                segs = decode_indirect_pages(pages, req, gsize)
                op = req.indirect_op
            else:
                assert isinstance(req, BlkifRequest)
                segs, op = req.segments, req.operation
            self.requests.append((req.operation, len(segs)))
            position = req.sector_number * 512
            for seg in segs:
                at = self.granule(seg.gref) + seg.first_sect * 512
                n = seg.nr_sectors * 512
                assert seg.first_sect * 512 + n <= gsize
                if op == BLKIF_OP_READ:
                    self.memory.view[at : at + n] = self.disk[position : position + n]
                else:
                    self.disk[position : position + n] = self.memory.view[at : at + n]
                position += n
            response = BlkifResponse(req.id, req.operation, BLKIF_RSP_OKAY)
            self.ring.put_response(BLKIF_ARM.encode_response(response))
        self.ring.push_responses()
        return served


def connect(
    page_size: int, order: int, *, indirect: int, persistent: bool
) -> tuple[Engine, Backend, bytearray, GrantTable]:
    memory = DomainMemory(GUEST, 16 << 20, page_size, 8192)
    grants = GrantTable(GUEST, memory.table, 8192, memory.nr_frames)
    engine = Engine(memory, grants, BACKEND)
    disk = bytearray(4 << 20)
    ring_page = memory.alloc_buffer(1 << max(order, 0))
    neg = Negotiated(
        protocol=BLKIF_ARM,
        queues=1,
        ring_page_order=order,
        sectors=len(disk) // 512,
        persistent=persistent,
        indirect_segments=indirect,
        grant_size=granule.granule_size(order),
        granule_order=order,
    )
    engine.connect(neg, [FrontRing(ring_page, BLKIF_ARM.ring_layout)])
    backend = Backend(memory, grants, ring_page, disk, granule.granule_size(order))
    return engine, backend, disk, grants


def run(engine: Engine, backend: Backend, ios: list[BlkIo]) -> None:
    for x in ios:
        engine.submit(x)
    done: list[BlkIo] = []
    for _ in range(1000):
        engine.dispatch()
        served = backend.serve()
        done += engine.poll(0)
        if not served and not engine.pending:
            break
    assert sorted(x.seq for x in done) == sorted(x.seq for x in ios)
    assert all(x.status == BLKIF_RSP_OKAY for x in ios)


def io(op: int, offset: int, length: int, page_size: int, data: bytes = b"") -> BlkIo:
    return BlkIo(op, offset // 512, length, offset % page_size, data or bytearray(length))


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize(
    ("page", "order", "indirect", "requests_64k", "requests_1m"),
    [
        # 64 KiB guest, 64 KiB granules: one segment per page
        (65536, 4, 0, [(BLKIF_OP_WRITE, 1)], [(BLKIF_OP_WRITE, 11), (BLKIF_OP_WRITE, 5)]),
        (65536, 4, 256, [(BLKIF_OP_WRITE, 1)], [(BLKIF_OP_INDIRECT, 16)]),
        # the same guest splitting into 4 KiB grants
        (65536, 0, 0, [(BLKIF_OP_WRITE, 11), (BLKIF_OP_WRITE, 5)], None),
        (65536, 0, 256, [(BLKIF_OP_INDIRECT, 16)], [(BLKIF_OP_INDIRECT, 256)]),
        # 16 KiB guest with 16 KiB granules
        (16384, 2, 256, [(BLKIF_OP_WRITE, 4)], [(BLKIF_OP_INDIRECT, 64)]),
    ],
)
def test_segments_per_granule(
    page: int,
    order: int,
    indirect: int,
    requests_64k: list[tuple[int, int]],
    requests_1m: list[tuple[int, int]] | None,
    persistent: bool,
) -> None:
    engine, backend, disk, grants = connect(page, order, indirect=indirect, persistent=persistent)
    rng = random.Random(order * 10 + indirect)
    small = rng.randbytes(65536)
    run(engine, backend, [io(BLKIF_OP_WRITE, 65536, 65536, page, small)])
    assert backend.requests == requests_64k and disk[65536:131072] == small
    backend.requests.clear()
    big = rng.randbytes(1 << 20)
    run(engine, backend, [io(BLKIF_OP_WRITE, 1 << 20, 1 << 20, page, big)])
    if requests_1m is not None:
        assert backend.requests == requests_1m
    assert disk[1 << 20 : 2 << 20] == big
    # reads, including ones that start and end inside a granule
    for offset, length in ((1 << 20, 1 << 20), (65536 + 512, 8192), ((1 << 20) + 3584, 70144)):
        r = io(BLKIF_OP_READ, offset, length, page)
        run(engine, backend, [r])
        assert bytes(r.data) == bytes(disk[offset : offset + length])
    engine.disconnect()
    assert grants.in_use() == 0  # every data, pool and indirect granule grant was ended


@settings(max_examples=30, deadline=None)
@given(
    order=st.sampled_from([0, 2, 4]),
    indirect=st.sampled_from([0, 32, 256]),
    persistent=st.booleans(),
    ops=st.lists(
        st.tuples(st.booleans(), st.integers(0, 4000), st.integers(1, 600)), min_size=1, max_size=8
    ),
)
def test_random_io_over_granules_matches_a_model(
    order: int, indirect: int, persistent: bool, ops: list[tuple[bool, int, int]]
) -> None:
    engine, backend, disk, _ = connect(65536, order, indirect=indirect, persistent=persistent)
    model = bytearray(len(disk))
    rng = random.Random(len(ops))
    for write, sector, count in ops:
        offset, length = sector * 512, count * 512
        if write:
            data = rng.randbytes(length)
            run(engine, backend, [io(BLKIF_OP_WRITE, offset, length, 65536, data)])
            model[offset : offset + length] = data
        else:
            r = io(BLKIF_OP_READ, offset, length, 65536)
            run(engine, backend, [r])
            assert bytes(r.data) == bytes(model[offset : offset + length])
    assert disk == model


@pytest.mark.parametrize("order", [-1, 5])
async def test_attach_refuses_an_order_outside_0_to_4(order: int) -> None:
    from typing import Any, cast

    from frontends.blkfront import GranuleNotSupported, attach
    from xenpv.xenbus.core import DeviceId

    with trio.fail_after(5), pytest.raises(GranuleNotSupported, match=r"expected 0\.\.4"):
        async with attach(
            cast(Any, None), cast(Any, None), DeviceId("vbd", 1, 0, 51712), granule_order=order
        ):
            pass  # pragma: no cover
