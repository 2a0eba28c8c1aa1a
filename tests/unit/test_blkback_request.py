"""blkback's request core: every slot a frontend can write decodes to a plan or an answer."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.blkback.keys import DeviceFeatures
from backends.blkback.request import (
    DataSegment,
    DeviceLimits,
    IoKind,
    IoRequest,
    NeedIndirect,
    Rejected,
    RequestCore,
)
from xenpv.abi.blkif import (
    BLKIF_NATIVE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_PROTOCOLS,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
    encode_indirect_pages,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.hv import LocalBuffer

ALL = DeviceFeatures(flush=True, barrier=True, discard=True, discard_secure=False, persistent=True)
NONE = DeviceFeatures(
    flush=False, barrier=False, discard=False, discard_secure=False, persistent=False
)
SIZE = 1 << 20  # 2048 sectors


def core(
    features: DeviceFeatures = ALL,
    *,
    read_only: bool = False,
    sector_size: int = 512,
    indirect: int = 256,
    protocol: str = "x86_64-abi",
) -> RequestCore:
    limits = DeviceLimits(SIZE, sector_size, read_only, features, indirect)
    return RequestCore(BLKIF_PROTOCOLS[protocol], limits)


def enc(request: BlkifRequest | BlkifDiscardRequest | BlkifIndirectRequest) -> bytes:
    return BLKIF_NATIVE.encode_request(request)


def seg(gref: int = 9, first: int = 0, last: int = 7) -> BlkifSegment:
    return BlkifSegment(gref, first, last)


def test_read_write_plans() -> None:
    plan = core().decode(enc(BlkifRequest(BLKIF_OP_WRITE, 5, 16, (seg(1), seg(2, 2, 3)))))
    assert plan == IoRequest(
        5,
        BLKIF_OP_WRITE,
        IoKind.WRITE,
        16 * 512,
        5120,
        (DataSegment(1, 0, 4096), DataSegment(2, 1024, 1024)),
    )
    flush = core().decode(enc(BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 6)))
    assert isinstance(flush, IoRequest) and flush.kind is IoKind.FLUSH and flush.length == 0


@pytest.mark.parametrize(
    ("request_", "features", "status"),
    [
        (BlkifRequest(BLKIF_OP_FLUSH_DISKCACHE, 1), NONE, BLKIF_RSP_EOPNOTSUPP),
        (BlkifRequest(BLKIF_OP_WRITE_BARRIER, 1), NONE, BLKIF_RSP_EOPNOTSUPP),
        (BlkifDiscardRequest(1, 0, 8), NONE, BLKIF_RSP_EOPNOTSUPP),
        (BlkifRequest(BLKIF_OP_READ, 1, 2048, (seg(),)), ALL, BLKIF_RSP_ERROR),
        (BlkifRequest(BLKIF_OP_READ, 1, 2047, (seg(9, 0, 0),)), ALL, None),
        (BlkifRequest(BLKIF_OP_READ, 1, 2047, (seg(9, 0, 1),)), ALL, BLKIF_RSP_ERROR),
        (BlkifDiscardRequest(1, 2000, 49), ALL, BLKIF_RSP_ERROR),
        (BlkifDiscardRequest(1, 2000, 48), ALL, None),
    ],
)
def test_feature_and_range_checks(
    request_: BlkifRequest | BlkifDiscardRequest, features: DeviceFeatures, status: int | None
) -> None:
    result = core(features).decode(enc(request_))
    if status is None:
        assert isinstance(result, IoRequest)
    else:
        assert isinstance(result, Rejected) and result.status == status
        assert result.id == 1 and result.operation == request_.operation


def test_read_only_and_large_sectors() -> None:
    ro = core(read_only=True)
    assert isinstance(ro.decode(enc(BlkifRequest(BLKIF_OP_READ, 1, 0, (seg(),)))), IoRequest)
    for op in (BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        result = ro.decode(enc(BlkifRequest(op, 1, 0, (seg(),))))
        assert isinstance(result, Rejected) and result.status == BLKIF_RSP_ERROR
    big = core(sector_size=4096)
    assert isinstance(big.decode(enc(BlkifRequest(BLKIF_OP_READ, 1, 8, (seg(),)))), IoRequest)
    for sector, s in ((4, seg()), (8, seg(9, 0, 3)), (8, seg(9, 4, 7))):
        result = big.decode(enc(BlkifRequest(BLKIF_OP_READ, 1, sector, (s,))))
        if s.first_sect == 4:  # 4 sectors at a frame offset: still not a whole 4 KiB sector
            assert isinstance(result, Rejected)
        else:
            assert isinstance(result, Rejected) and "misaligned" in result.reason
    discard = big.decode(enc(BlkifDiscardRequest(1, 8, 4)))
    assert isinstance(discard, Rejected) and discard.status == BLKIF_RSP_ERROR


def test_secure_discard_only_when_advertised() -> None:
    plain = core().decode(enc(BlkifDiscardRequest(1, 0, 8, flag=1)))
    assert isinstance(plain, IoRequest) and not plain.secure
    features = DeviceFeatures(True, True, True, True, True)
    secure = core(features).decode(enc(BlkifDiscardRequest(1, 0, 8, flag=1)))
    assert isinstance(secure, IoRequest) and secure.secure
    assert secure.operation == BLKIF_OP_DISCARD


def test_indirect() -> None:
    c = core()
    request = BlkifIndirectRequest(BLKIF_OP_WRITE, 3, 64, 20, (77,))
    pending = c.decode(enc(request))
    assert isinstance(pending, NeedIndirect) and pending.request.indirect_grefs == (77,)
    pages = encode_indirect_pages([seg(i) for i in range(20)])
    plan = c.finish_indirect(pending.request, pages)
    assert isinstance(plan, IoRequest) and plan.operation == BLKIF_OP_WRITE
    assert plan.length == 20 * 4096 and plan.segments[19] == DataSegment(19, 0, 4096)
    bad = c.finish_indirect(pending.request, encode_indirect_pages([seg(1, 7, 1)] * 20))
    assert isinstance(bad, Rejected) and bad.operation == BLKIF_OP_WRITE
    off = core(indirect=0).decode(enc(request))
    assert isinstance(off, Rejected) and off.status == BLKIF_RSP_EOPNOTSUPP
    too_many = core(indirect=16).decode(enc(request))
    assert isinstance(too_many, Rejected) and too_many.status == BLKIF_RSP_ERROR


@settings(max_examples=400)
@given(
    st.builds(
        lambda op, nseg, rest: bytes([op, nseg]) + rest,
        st.one_of(st.integers(0, 7), st.integers(0, 255)),
        st.one_of(st.integers(0, 12), st.integers(0, 255)),
        st.binary(min_size=110, max_size=110),
    ),
    st.sampled_from(sorted(BLKIF_PROTOCOLS)),
    st.sampled_from([512, 4096]),
    st.booleans(),
    st.sampled_from([ALL, NONE]),
)
def test_any_slot_decodes_safely(
    data: bytes, protocol: str, sector_size: int, read_only: bool, features: DeviceFeatures
) -> None:
    """Garbage in a slot: a plan inside the device, an indirect page list, or an answer."""
    c = core(features, read_only=read_only, sector_size=sector_size, protocol=protocol)
    result = c.decode(data[: c.protocol.request_size])
    if isinstance(result, Rejected):
        assert result.status in (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
        assert 0 <= result.operation <= 255
        c.response(result.id, result.operation, result.status)  # always encodable
    elif isinstance(result, IoRequest):
        assert result.offset >= 0 and result.offset + result.length <= SIZE
        assert result.offset % sector_size == 0 and result.length % sector_size == 0
        if result.kind is not IoKind.READ:
            assert not read_only
        for s in result.segments:
            assert 0 <= s.offset < s.offset + s.length <= 4096
        assert sum(s.length for s in result.segments) == (
            result.length if result.kind is not IoKind.DISCARD else 0
        )
    else:
        assert 1 <= len(result.request.indirect_grefs) <= 8


def test_front_and_back_rings_in_memory() -> None:
    """The core between a FrontRing and a BackRing on one LocalBuffer: out-of-order answers."""
    buf = LocalBuffer(4096)
    front = FrontRing(buf, BLKIF_NATIVE.ring_layout)
    back = BackRing(buf, BLKIF_NATIVE.ring_layout)
    c = core()
    for i in range(5):
        front.put_request(enc(BlkifRequest(BLKIF_OP_READ, 100 + i, 8 * i, (seg(i),))))
    assert front.push_requests()
    taken = []
    while (data := back.take_request()) is not None:
        taken.append(c.decode(data))
    assert not back.final_check_for_requests()
    for plan in reversed(taken):  # complete in reverse order
        assert isinstance(plan, IoRequest)
        back.put_response(c.response(plan.id, plan.operation, 0))
    assert back.push_responses()
    got = []
    while (raw := front.take_response()) is not None:
        got.append(BLKIF_NATIVE.decode_response(raw))
    assert got == [BlkifResponse(104 - i, BLKIF_OP_READ, 0) for i in range(5)]


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x06\x01" + bytes(10)])
def test_short_slots_are_rejected(data: bytes) -> None:
    result = core().decode(data)
    assert isinstance(result, Rejected) and result.status == BLKIF_RSP_ERROR


class _CodecOnly:
    """A protocol without the one-segment shortcut: every slot goes through the codec."""

    def __init__(self, name: str) -> None:
        self._protocol = BLKIF_PROTOCOLS[name]

    def single_segment(self, data: bytes) -> None:
        return None

    def __getattr__(self, name: str) -> object:
        return getattr(self._protocol, name)


@settings(max_examples=300, deadline=None)
@given(
    protocol=st.sampled_from(sorted(BLKIF_PROTOCOLS)),
    op=st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]),
    sector=st.integers(0, 2**64 - 1) | st.integers(2030, 2060),
    first=st.integers(0, 255),
    last=st.integers(0, 255),
    sector_size=st.sampled_from([512, 4096]),
    read_only=st.booleans(),
    granule=st.sampled_from([4096, 16384]),
)
def test_one_segment_shortcut_decides_as_the_codec(
    protocol: str,
    op: int,
    sector: int,
    first: int,
    last: int,
    sector_size: int,
    read_only: bool,
    granule: int,
) -> None:
    """`RequestCore.decode`'s one-segment READ/WRITE path plans, refuses and answers
    exactly as the full codec path does, for any sector range, device and ABI."""
    p = BLKIF_PROTOCOLS[protocol]
    slot = bytearray(p.request_size)
    head = struct.Struct("<BBHQQ" if protocol == "x86_32-abi" else "<BBHxxxxQQ")
    head.pack_into(slot, 0, op, 1, 7, 4242, sector)
    struct.pack_into("<IBBxx", slot, head.size, 99, first, last)
    fast = core(read_only=read_only, sector_size=sector_size, protocol=protocol)
    fast.limits.granule = granule
    slow = core(read_only=read_only, sector_size=sector_size, protocol=protocol)
    slow.limits.granule = granule
    slow.protocol = _CodecOnly(protocol)  # type: ignore[assignment]
    assert fast.decode(bytes(slot)) == slow.decode(bytes(slot))
