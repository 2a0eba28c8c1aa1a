"""blkif codecs: round trips, what decoding rejects, and fuzzed garbage (sans-IO)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.abi_strategies import segment_lists, u8, u16, u32, u64
from xenpv.abi.blkif import (
    BLKIF_ARM,
    BLKIF_NATIVE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_PROTOCOLS,
    BLKIF_RING,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_X86_32,
    BLKIF_X86_64,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
    blkif_protocol,
    decode_indirect_pages,
    decode_indirect_segments,
    encode_indirect_pages,
    indirect_pages,
    max_indirect_segments_limit,
)
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.errors import BlkifError, BlkifUnsupportedOp
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.errors import XenpvError

PROTOCOLS = list(BLKIF_PROTOCOLS.values())
GRANULES = st.sampled_from([4096, 16384, 65536])


@st.composite
def direct_requests(draw: st.DrawFn) -> BlkifRequest:
    op = draw(
        st.sampled_from(
            [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE]
        )
    )
    segs = draw(segment_lists(1 if op in (BLKIF_OP_READ, BLKIF_OP_WRITE) else 0, 11))
    return BlkifRequest(int(op), draw(u64), draw(u64), segs, draw(u16))


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_requests_round_trip(p: BlkifProtocol, data: st.DataObject) -> None:
    request = data.draw(
        st.one_of(
            direct_requests(),
            st.builds(BlkifDiscardRequest, u64, u64, u64, u8, u16),
        )
    )
    encoded = p.encode_request(request)
    assert len(encoded) <= p.request_size
    assert p.decode_request(encoded) == request
    # as the ring delivers it: a whole slot, stale bytes after the struct
    slot = encoded + b"\xee" * (p.request_size - len(encoded))
    assert p.decode_request(slot) == request
    if isinstance(request, BlkifRequest):  # the raw-tuple encoder is byte-identical
        raw = [(seg.gref, seg.first_sect, seg.last_sect) for seg in request.segments]
        args = (request.operation, request.id, request.sector_number, request.handle, raw)
        assert p.encode_rw(*args) == encoded
        one = p.single_segment(encoded)
        if request.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE) and len(raw) == 1:
            assert one == (request.operation, request.id, request.sector_number, *raw[0])
        else:
            assert one is None


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
@given(
    nr=st.integers(1, 4096),
    op=st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]),
    id=u64,
    sector=u64,
    handle=u16,
    data=st.data(),
)
@settings(max_examples=100, deadline=None)
def test_indirect_requests_round_trip(
    p: BlkifProtocol, nr: int, op: int, id: int, sector: int, handle: int, data: st.DataObject
) -> None:
    grefs = tuple(data.draw(u32) for _ in range(indirect_pages(nr)))
    request = BlkifIndirectRequest(int(op), id, sector, nr, grefs, handle)
    encoded = p.encode_request(request)
    assert len(encoded) == 64
    assert p.decode_request(encoded, max_indirect_segments=4096) == request


@given(granule=GRANULES, data=st.data())
@settings(max_examples=60, deadline=None)
def test_indirect_pages_round_trip(granule: int, data: st.DataObject) -> None:
    segs = data.draw(segment_lists(1, 700, granule))
    pages = encode_indirect_pages(segs, granule)
    assert all(len(page) == granule for page in pages)
    assert len(pages) == indirect_pages(len(segs), granule)
    request = BlkifIndirectRequest(0, 1, 0, len(segs), tuple(range(len(pages))))
    assert decode_indirect_pages(pages, request, granule) == tuple(segs)


@given(
    granule=GRANULES,
    count=st.integers(1, 1100),
    bad=st.none() | st.tuples(st.integers(0, 1099), st.integers(0, 255), st.integers(0, 255)),
)
@settings(max_examples=80, deadline=None)
def test_indirect_segments_fast_path_checks_as_the_dataclass_path(
    granule: int, count: int, bad: tuple[int, int, int] | None
) -> None:
    """decode_indirect_segments (plain tuples, bounds checked on byte slices) accepts and
    refuses exactly what a check per descriptor does, naming the first bad segment."""
    max_sect = granule // 512 - 1
    segs = [BlkifSegment(1000 + i, 0, max_sect) for i in range(count)]
    if bad is not None and bad[0] < count:
        segs[bad[0]] = BlkifSegment(7, bad[1], bad[2])
    pages = encode_indirect_pages(segs, granule)
    request = BlkifIndirectRequest(0, 3, 0, count, tuple(range(len(pages))))
    first_bad = next(
        (i for i, s in enumerate(segs) if not s.first_sect <= s.last_sect <= max_sect), None
    )
    if first_bad is None:
        raw = decode_indirect_segments(pages, request, granule)
        assert raw == [(s.gref, s.first_sect, s.last_sect) for s in segs]
    else:
        with pytest.raises(BlkifError, match=rf"^segment {first_bad}: ") as info:
            decode_indirect_segments(pages, request, granule)
        assert info.value.id == 3


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
@given(id=u64, op=u8, status=st.integers(-(2**15), 2**15 - 1))
@settings(deadline=None)
def test_responses_round_trip(p: BlkifProtocol, id: int, op: int, status: int) -> None:
    response = BlkifResponse(id, op, status)
    encoded = p.encode_response(response)
    assert len(encoded) == p.response_size
    assert p.decode_response(encoded) == response


def test_abi_sizes_and_the_x86_32_id_offset() -> None:
    assert (BLKIF_X86_64.request_size, BLKIF_X86_64.response_size) == (112, 16)
    assert (BLKIF_ARM.request_size, BLKIF_ARM.response_size) == (112, 16)
    assert (BLKIF_X86_32.request_size, BLKIF_X86_32.response_size) == (108, 12)
    request = BlkifRequest(BLKIF_OP_READ, 0x1122334455667788, 9, (BlkifSegment(3, 0, 7),))
    native, packed = BLKIF_X86_64.encode_request(request), BLKIF_X86_32.encode_request(request)
    assert native[8:16] == packed[4:12] == struct.pack("<Q", 0x1122334455667788)
    assert native[16:24] == packed[12:20] == struct.pack("<Q", 9)
    assert native[24:32] == packed[20:28] == bytes([3, 0, 0, 0, 0, 7, 0, 0])
    assert BLKIF_ARM.encode_request(request) == native
    assert BLKIF_RING is BLKIF_NATIVE.ring_layout


def test_protocol_lookup() -> None:
    assert blkif_protocol("x86_32-abi") is BLKIF_X86_32
    assert blkif_protocol("arm-abi") is BLKIF_ARM
    assert blkif_protocol(None) is blkif_protocol("") is BLKIF_X86_64
    with pytest.raises(BlkifError, match="unknown blkif protocol 'sparc-abi'"):
        blkif_protocol("sparc-abi")


def _raw(p: BlkifProtocol, op: int, nr: int, id: int = 77, segs: bytes = b"") -> bytes:
    head = struct.pack("<BBHQQ" if p is BLKIF_X86_32 else "<BBH4xQQ", op, nr, 0, id, 0)
    return (head + segs).ljust(p.request_size, b"\0")


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
def test_segment_counts(p: BlkifProtocol) -> None:
    seg = struct.pack("<IBBxx", 1, 0, 7)
    for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        with pytest.raises(BlkifError, match="0 segments") as info:
            p.decode_request(_raw(p, op, 0))
        assert (info.value.id, info.value.operation) == (77, op)
    for op in (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE):
        assert p.decode_request(_raw(p, op, 0)) == BlkifRequest(int(op), 77, 0, (), 0)
    assert len(p.decode_request(_raw(p, BLKIF_OP_WRITE, 11, segs=seg * 11)).segments) == 11
    for op in (BLKIF_OP_READ, BLKIF_OP_FLUSH_DISKCACHE):
        with pytest.raises(BlkifError, match="12 segments") as info:
            p.decode_request(_raw(p, op, 12, segs=seg * 11))
        assert info.value.id == 77
    with pytest.raises(BlkifError, match="at most 11"):
        p.encode_request(BlkifRequest(BLKIF_OP_READ, 1, 0, (BlkifSegment(1, 0, 7),) * 12))


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
def test_sector_ranges_within_the_frame(p: BlkifProtocol) -> None:
    def one(first: int, last: int) -> bytes:
        return _raw(p, BLKIF_OP_READ, 1, segs=struct.pack("<IBBxx", 5, first, last))

    assert p.decode_request(one(0, 7)).segments == (BlkifSegment(5, 0, 7),)
    assert p.decode_request(one(3, 3)).segments == (BlkifSegment(5, 3, 3),)
    with pytest.raises(BlkifError, match=r"sectors 4\.\.3 outside 0\.\.7") as info:
        p.decode_request(one(4, 3))
    assert info.value.id == 77
    with pytest.raises(BlkifError, match=r"outside 0\.\.7"):
        p.decode_request(one(0, 8))
    # a 16 KiB granule holds sectors 0..31
    assert p.decode_request(one(0, 31), granule=16384).segments == (BlkifSegment(5, 0, 31),)
    with pytest.raises(BlkifError, match=r"outside 0\.\.31"):
        p.decode_request(one(0, 32), granule=16384)
    pages = encode_indirect_pages([BlkifSegment(1, 0, 7), BlkifSegment(2, 6, 5)])
    with pytest.raises(BlkifError, match="segment 1"):
        decode_indirect_pages(pages, BlkifIndirectRequest(0, 9, 0, 2, (1,)))


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
def test_unknown_operations_are_unsupported_not_garbage(p: BlkifProtocol) -> None:
    for op in (4, 7, 8, 100, 255):
        with pytest.raises(BlkifUnsupportedOp) as info:
            p.decode_request(_raw(p, op, 0, id=1234))
        assert (info.value.id, info.value.operation) == (1234, op)
        assert isinstance(info.value, BlkifError) and isinstance(info.value, XenpvError)
    indirect = p.encode_request(BlkifIndirectRequest(0, 55, 0, 100, (9,)))
    with pytest.raises(BlkifUnsupportedOp, match="not advertised") as info:
        p.decode_request(indirect)  # the backend did not advertise indirect segments
    assert info.value.id == 55


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
def test_indirect_limits(p: BlkifProtocol) -> None:
    def req(op: int, nr: int) -> bytes:
        return p.encode_request(BlkifIndirectRequest(op, 8, 0, nr, (1,) * indirect_pages(nr)))

    assert p.decode_request(req(1, 256), max_indirect_segments=256).nr_segments == 256
    with pytest.raises(BlkifError, match=r"257 segments \(allowed: 1\.\.256\)"):
        p.decode_request(req(1, 257), max_indirect_segments=256)
    with pytest.raises(BlkifError, match="0 segments"):
        p.decode_request(req(0, 0), max_indirect_segments=256)
    with pytest.raises(BlkifError, match="invalid indirect operation 3") as info:
        p.decode_request(req(3, 8), max_indirect_segments=256)
    assert (info.value.id, info.value.operation) == (8, BLKIF_OP_INDIRECT)
    # 8 pages of 512 descriptors at most, whatever the backend claims
    assert max_indirect_segments_limit() == 4096
    with pytest.raises(BlkifError, match=r"allowed: 1\.\.4096"):
        p.decode_request(
            p.encode_request(BlkifIndirectRequest(0, 8, 0, 4097, (1,) * 8)),
            max_indirect_segments=10**6,
        )
    with pytest.raises(BlkifError, match="need 2 pages, got 1"):
        decode_indirect_pages([bytes(4096)], BlkifIndirectRequest(0, 8, 0, 513, (1, 2)))


def test_discard_keeps_the_flag_byte() -> None:
    d = BLKIF_NATIVE.decode_request(BLKIF_NATIVE.encode_request(BlkifDiscardRequest(1, 2, 3, 3)))
    assert isinstance(d, BlkifDiscardRequest)
    assert d.secure and d.flag == 3 and d.operation == BLKIF_OP_DISCARD


def test_unrepresentable_values_are_typed_errors() -> None:
    with pytest.raises(BlkifError, match="cannot encode"):
        BLKIF_NATIVE.encode_request(BlkifRequest(BLKIF_OP_READ, 2**64, 0))
    with pytest.raises(BlkifError, match="cannot encode"):
        BLKIF_NATIVE.encode_response(BlkifResponse(1, 0, 2**15))
    with pytest.raises(BlkifError, match="indirect pages"):
        BLKIF_NATIVE.encode_request(BlkifIndirectRequest(0, 1, 0, 1, (0,) * 9))
    with pytest.raises(BlkifError):
        encode_indirect_pages([BlkifSegment(2**32, 0, 0)])


def test_short_data_is_a_typed_error() -> None:
    with pytest.raises(BlkifError, match="3-byte blkif request"):
        BLKIF_NATIVE.decode_request(b"\0\1\2")
    with pytest.raises(BlkifError, match="cannot hold 2 segments"):
        BLKIF_NATIVE.decode_request(_raw(BLKIF_NATIVE, 0, 2)[:30])
    with pytest.raises(BlkifError, match="discard"):
        BLKIF_NATIVE.decode_request(_raw(BLKIF_NATIVE, BLKIF_OP_DISCARD, 0)[:28])
    with pytest.raises(BlkifError, match="response"):
        BLKIF_X86_32.decode_response(bytes(11))


@pytest.mark.parametrize("p", PROTOCOLS, ids=str)
@given(
    data=st.binary(max_size=130),
    max_indirect=st.integers(0, 5000),
    granule=GRANULES,
)
@settings(max_examples=300, deadline=None)
def test_garbage_raises_only_typed_errors(
    p: BlkifProtocol, data: bytes, max_indirect: int, granule: int
) -> None:
    if len(data) >= p.response_size:  # every response value is representable
        response = p.decode_response(data)
        assert p.decode_response(p.encode_response(response)) == response
    else:
        with pytest.raises(BlkifError):
            p.decode_response(data)
    try:
        request = p.decode_request(data, max_indirect_segments=max_indirect, granule=granule)
    except BlkifError:
        return
    # whatever decodes is a valid request: it survives a round trip unchanged
    again = p.decode_request(
        p.encode_request(request), max_indirect_segments=max_indirect, granule=granule
    )
    assert again == request


def test_a_4k_read_through_a_ring_answered_eopnotsupp_for_unknown_ops() -> None:
    """What a backend loop does with the codec and the ring, end to end."""
    buffer = LocalBuffer(4096)
    p = BLKIF_X86_32
    front, back = FrontRing(buffer, p.ring_layout), BackRing(buffer, p.ring_layout)
    front.put_request(p.encode_request(BlkifRequest(0, 1, 8, (BlkifSegment(3, 0, 7),))))
    front.put_request(_raw(p, 4, 0, id=2))
    front.push_requests()
    while (data := back.take_request()) is not None:
        try:
            request = p.decode_request(data)
            back.put_response(p.encode_response(BlkifResponse(request.id, request.operation, 0)))
        except BlkifUnsupportedOp as exc:
            assert exc.id is not None and exc.operation is not None
            back.put_response(
                p.encode_response(BlkifResponse(exc.id, exc.operation, BLKIF_RSP_EOPNOTSUPP))
            )
    back.push_responses()
    responses = []
    while (data := front.take_response()) is not None:
        responses.append(p.decode_response(data))
    assert responses == [BlkifResponse(1, 0, 0), BlkifResponse(2, 4, -2)]
