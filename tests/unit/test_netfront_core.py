"""netfront's sans-IO cores against a stand-in backend over in-memory rings (LocalBuffer)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontends.netfront.core import (
    MAX_RX_SLOTS,
    NetfrontError,
    NetfrontProtocolError,
    RxCore,
    RxFrame,
    TxCore,
    split,
)
from xenpv.abi.errors import RingError
from xenpv.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifGsoExtra,
    NetifMcastExtra,
    NetifRxResponse,
    NetifTxResponse,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    decode_extra,
    decode_rx_request,
    decode_tx_request,
    encode_extra,
    encode_rx_response,
    encode_tx_response,
    tx_fragment_sizes,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.hv import XEN_PAGE_SIZE, LocalBuffer
from xenpv.metrics.counters import NetfrontStats

GRANULE = XEN_PAGE_SIZE


# --- a stand-in backend -----------------------------------------------------------------------


class TxPair:
    """A TxCore over a LocalBuffer ring, its arena, and a backend that takes whole packets."""

    def __init__(self) -> None:
        self.buffer = LocalBuffer()
        self.core = TxCore(FrontRing(self.buffer, NETIF_TX_RING), GRANULE)
        self.back = BackRing(self.buffer, NETIF_TX_RING)
        self.arena = bytearray(GRANULE * self.core.ring.nr_ents)
        self.next_gref = 1000
        self.gref_to_id: dict[int, int] = {}

    def send(self, frame: bytes, **kwargs: object) -> None:
        pieces = self.core.plan(len(frame), kwargs.get("gso"))  # type: ignore[arg-type]
        ids = self.core.alloc_ids(len(pieces))
        grefs = []
        position = 0
        for slot_id, (_i, offset, size) in zip(ids, pieces, strict=True):
            start = slot_id * GRANULE + offset
            self.arena[start : start + size] = frame[position : position + size]
            position += size
            self.next_gref += 1
            self.gref_to_id[self.next_gref] = slot_id
            grefs.append(self.next_gref)
        self.core.put_packet(ids, grefs, pieces, **kwargs)  # type: ignore[arg-type]
        self.core.push()

    def backend_take(self) -> list[tuple[bytes, int, NetifGsoExtra | None, list[int]]]:
        """Decode every pushed packet: (data, first flags, gso, ids)."""
        packets = []
        raw = self.back.take_requests()
        i = 0
        while i < len(raw):
            first = decode_tx_request(raw[i])
            i += 1
            gso = None
            if first.flags & NETTXF_extra_info:
                extra = decode_extra(raw[i])
                i += 1
                assert isinstance(extra, NetifGsoExtra)
                gso = extra
            chain = [first]
            while chain[-1].flags & 4:  # more_data
                chain.append(decode_tx_request(raw[i]))
                i += 1
            sizes = tx_fragment_sizes(chain, GRANULE)
            data = b""
            for request, size in zip(chain, sizes, strict=True):
                base = self.gref_to_id[request.gref] * GRANULE + request.offset
                data += bytes(self.arena[base : base + size])
            packets.append((data, first.flags, gso, [r.id for r in chain]))
            # answer: one response per request slot, NULL for the extra
            self.back.put_response(encode_tx_response(NetifTxResponse(first.id, NETIF_RSP_OKAY)))
            if gso is not None:
                self.back.put_response(encode_tx_response(NetifTxResponse(0, NETIF_RSP_NULL)))
            for request in chain[1:]:
                self.back.put_response(
                    encode_tx_response(NetifTxResponse(request.id, NETIF_RSP_OKAY))
                )
        self.back.push_responses()
        return packets


class RxPair:
    """An RxCore with 256 buffers, and a backend that writes chains into them."""

    def __init__(self, granule: int = GRANULE) -> None:
        self.buffer = LocalBuffer()
        ring = FrontRing(self.buffer, NETIF_RX_RING)
        self.pages = [memoryview(bytearray(granule)) for _ in range(ring.nr_ents)]
        self.core = RxCore(ring, self.pages, list(range(500, 500 + ring.nr_ents)), granule, 3)
        self.back = BackRing(self.buffer, NETIF_RX_RING)
        self.granule = granule
        self.got: list[RxFrame] = []
        self.core.post()

    def deliver(
        self,
        frame: bytes,
        *,
        chunk: int | None = None,
        gso: NetifGsoExtra | None = None,
        flags: int = 0,
        push: bool = True,
        offset: int = 0,
    ) -> None:
        chunk = chunk or self.granule - offset
        pieces = [frame[i : i + chunk] for i in range(0, len(frame), chunk)] or [b""]
        for n, piece in enumerate(pieces):
            request = decode_rx_request(self.back.take_requests(1)[0])
            page = self.pages[request.gref - 500]
            page[offset : offset + len(piece)] = piece
            f = (flags if n == 0 else 0) | (NETRXF_more_data if n < len(pieces) - 1 else 0)
            if n == 0 and gso is not None:
                f |= NETRXF_extra_info
            response = NetifRxResponse(request.id, offset, f, len(piece))
            self.back.put_response(encode_rx_response(response))
            if n == 0 and gso is not None:
                self.back.take_requests(1)
                self.back.put_response(encode_extra(gso))
        if push:
            self.back.push_responses()

    def pump(self) -> int:
        taken = self.core.take(self.got.append)
        self.core.post()
        return taken


# --- split ------------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.integers(0, 3 * GRANULE), st.integers(1, 70000), st.sampled_from([4096, 16384, 65536]))
def test_split_never_crosses_a_granule(offset: int, length: int, granule: int) -> None:
    pieces = split(offset, length, granule)
    assert sum(size for _i, _o, size in pieces) == length
    position = offset
    for index, inside, size in pieces:
        assert size > 0 and inside + size <= granule
        assert index * granule + inside == position
        position += size
    # only the first and last pieces may be partial
    assert all(inside == 0 for _i, inside, _s in pieces[1:])


def test_split_rejects_empty() -> None:
    with pytest.raises(NetfrontError):
        split(0, 0, GRANULE)


# --- tx ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(1, 65535),
            st.sampled_from([None, XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6]),
            st.booleans(),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 2**32),
)
def test_tx_packets_arrive_intact(packets: list[tuple[int, int | None, bool]], seed: int) -> None:
    rng = random.Random(seed)  # payload bytes from a seed: Hypothesis only draws the shape
    pair = TxPair()
    for length, gso_type, csum in packets:
        frame = rng.randbytes(length)
        gso = NetifGsoExtra(1448, gso_type) if gso_type is not None else None
        while not pair.core.room(len(pair.core.plan(length, gso)), gso is not None):
            pair.backend_take()
            pair.core.collect()
        pair.send(frame, gso=gso, csum_blank=csum)
        (data, flags, got_gso, ids), *_ = pair.backend_take() or [(b"", 0, None, [])]
        assert data == frame
        assert len(ids) == -(-length // GRANULE)
        assert bool(flags & NETTXF_csum_blank) == csum
        assert bool(flags & NETTXF_data_validated) == csum
        assert (got_gso.gso_type if got_gso else None) == gso_type
        assert len(pair.core.collect()) == len(ids)
    assert pair.core.in_flight() == 0
    assert pair.core.counters.tx_packets == len(packets)


def test_tx_ring_fills_and_ids_recycle() -> None:
    pair = TxPair()
    frame = bytes(range(256)) * 16  # exactly one granule: one slot
    sent = 0
    while pair.core.room(1, False):
        pair.send(frame)
        sent += 1
    assert sent == 256
    with pytest.raises(Exception, match="no room"):
        pair.core.put_packet([0], [1], [(0, 0, 10)])
    assert len(pair.backend_take()) == 256
    assert len(pair.core.collect()) == 256
    for _ in range(3):  # wrap the ring several times
        for _ in range(200):
            pair.send(frame)
        pair.backend_take()
        pair.core.collect()
    assert pair.core.in_flight() == 0


def test_tx_frame_size_limits() -> None:
    core = TxPair().core
    for bad in (0, 65536):
        with pytest.raises(NetfrontError):
            core.plan(bad, None)
    with pytest.raises(NetfrontError):
        core.plan(100, NetifGsoExtra(0, XEN_NETIF_GSO_TYPE_TCPV4))
    with pytest.raises(NetfrontError):
        core.plan(100, NetifGsoExtra(1448, 7))
    assert len(core.plan(65535, None)) == 16


def test_tx_response_for_unknown_id_is_a_protocol_error() -> None:
    pair = TxPair()
    pair.send(b"x" * 100)
    pair.back.take_requests()
    pair.back.put_response(encode_tx_response(NetifTxResponse(77, NETIF_RSP_OKAY)))
    pair.back.push_responses()
    with pytest.raises(NetfrontProtocolError):
        pair.core.collect()


def test_tx_error_status_is_counted_and_frees_the_slot() -> None:
    pair = TxPair()
    pair.send(b"x" * 100)
    (request,) = pair.back.take_requests()
    pair.back.put_response(
        encode_tx_response(NetifTxResponse(decode_tx_request(request).id, NETIF_RSP_ERROR))
    )
    pair.back.push_responses()
    assert len(pair.core.collect()) == 1
    assert pair.core.counters.tx_errors == 1 and pair.core.in_flight() == 0


def test_tx_abandon_counts_dropped_packets() -> None:
    pair = TxPair()
    pair.send(b"a" * 9000)
    pair.send(b"b" * 60)
    assert pair.core.packets_in_flight() == 2
    assert len(pair.core.abandon()) == 4
    assert pair.core.counters.tx_dropped == 2 and pair.core.in_flight() == 0


def test_too_many_responses_break_the_ring() -> None:
    pair = TxPair()
    pair.send(b"x" * 100)
    pair.buffer.view[8:12] = (5).to_bytes(4, "little")  # rsp_prod far ahead
    with pytest.raises(RingError):
        pair.core.collect()


# --- rx ---------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(1, 65535),
            st.integers(1, GRANULE),
            st.integers(0, 64),
            st.booleans(),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 2**32),
)
def test_rx_chains_reassemble(packets: list[tuple[int, int, int, bool, bool]], seed: int) -> None:
    rng = random.Random(seed)
    pair = RxPair()
    sent = []
    for length, chunk, offset, gso, csum in packets:
        chunk = max(1, min(chunk, GRANULE - offset))
        if -(-length // chunk) > MAX_RX_SLOTS:
            chunk = -(-length // MAX_RX_SLOTS)
            offset = min(offset, GRANULE - chunk)
        frame = rng.randbytes(length)
        extra = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if gso else None
        flags = (NETRXF_csum_blank | NETRXF_data_validated) if csum else 0
        pair.deliver(frame, chunk=chunk, gso=extra, flags=flags, offset=offset)
        pair.pump()
        sent.append((frame, gso, csum))
    assert [(f.frame, f.gso is not None, f.csum_blank) for f in pair.got] == sent
    assert all(f.queue == 3 and f.data_validated == f.csum_blank for f in pair.got)
    assert pair.core.ring.free_requests() == 0  # everything reposted


def test_rx_chain_split_across_pushes_is_kept() -> None:
    pair = RxPair()
    frame = bytes(range(256)) * 40  # 10240 bytes: 3 slots
    # push only the first two responses: the chain continues later
    for n, piece in enumerate([frame[:4096], frame[4096:8192]]):
        request = decode_rx_request(pair.back.take_requests(1)[0])
        pair.pages[request.gref - 500][: len(piece)] = piece
        pair.back.put_response(
            encode_rx_response(NetifRxResponse(request.id, 0, NETRXF_more_data, len(piece)))
        )
        assert n < 2
    pair.back.push_responses()
    pair.pump()
    assert pair.got == [] and pair.core.pending_partial()
    for page in pair.pages:  # reposted buffers may be rewritten before the chain completes
        page[:] = b"\xee" * len(page)
    request = decode_rx_request(pair.back.take_requests(1)[0])
    pair.pages[request.gref - 500][:2048] = frame[8192:]
    pair.back.put_response(encode_rx_response(NetifRxResponse(request.id, 0, 0, 2048)))
    pair.back.push_responses()
    pair.pump()
    assert [f.frame for f in pair.got] == [frame]


def _respond(pair: RxPair, *responses: NetifRxResponse | bytes) -> None:
    for response in responses:
        pair.back.take_requests(1)
        data = response if isinstance(response, bytes) else encode_rx_response(response)
        pair.back.put_response(data)
    pair.back.push_responses()


@pytest.mark.parametrize(
    "bad",
    [
        "error status",
        "outside granule",
        "wrong id",
        "bad extra",
        "too many slots",
    ],
)
def test_rx_bad_packets_are_dropped_whole_and_traffic_continues(bad: str) -> None:
    pair = RxPair()
    base = pair.core.ring.rsp_cons & 255
    more = NETRXF_more_data
    if bad == "error status":
        _respond(pair, NetifRxResponse(base, 0, more, 100), NetifRxResponse(base + 1, 0, 0, -1))
    elif bad == "outside granule":
        _respond(pair, NetifRxResponse(base, 4000, more, 200), NetifRxResponse(base + 1, 0, 0, 10))
    elif bad == "wrong id":
        _respond(pair, NetifRxResponse(base + 7, 0, 0, 100))
    elif bad == "bad extra":
        _respond(
            pair,
            NetifRxResponse(base, 0, NETRXF_extra_info | more, 100),
            bytes(8),  # extra type NONE
            NetifRxResponse(base + 2, 0, 0, 100),
        )
    else:
        _respond(
            pair,
            *[NetifRxResponse(base + i, 0, more, 10) for i in range(MAX_RX_SLOTS)],
            NetifRxResponse(base + MAX_RX_SLOTS, 0, 0, 10),
        )
    pair.pump()
    assert pair.got == [] and not pair.core.pending_partial()
    assert pair.core.counters.rx_errors == 1
    reason = {
        "error status": "rx_bad_status",
        "outside granule": "rx_bad_offset",
        "wrong id": "rx_bad_id",
        "bad extra": "rx_bad_extra",
        "too many slots": "rx_too_many_slots",
    }[bad]
    drops = {name: getattr(pair.core.counters, name) for name in DROP_REASONS}
    assert drops == dict.fromkeys(DROP_REASONS, 0) | {reason: 1}
    pair.deliver(b"good frame" * 10)
    pair.pump()
    assert [f.frame for f in pair.got] == [b"good frame" * 10]


def test_rx_single_slot_gso_and_multicast_extra() -> None:
    pair = RxPair()
    base = pair.core.ring.rsp_cons & 255
    mcast = NetifMcastExtra(2, b"\x01\x00\x5e\x00\x00\x01", 0)
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV6, 0, XEN_NETIF_EXTRA_FLAG_MORE)
    pair.pages[base][:5] = b"hello"
    _respond(
        pair,
        NetifRxResponse(base, 0, NETRXF_extra_info, 5),
        encode_extra(gso),
        encode_extra(mcast),
    )
    pair.pump()
    (frame,) = pair.got
    assert frame.frame == b"hello"
    assert frame.gso == NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV6, 0, 0)


def test_rx_empty_packet_is_an_error() -> None:
    pair = RxPair()
    base = pair.core.ring.rsp_cons & 255
    _respond(pair, NetifRxResponse(base, 0, 0, 0))
    pair.pump()
    assert pair.got == [] and pair.core.counters.rx_errors == 1
    assert pair.core.counters.rx_empty == 1


DROP_REASONS = (
    "rx_bad_status",
    "rx_bad_offset",
    "rx_bad_id",
    "rx_bad_extra",
    "rx_too_many_slots",
    "rx_empty",
)


def _counted_traffic() -> NetfrontStats:
    """Frames of 60, 1514, 4096 and 9000 bytes sent (1, 1, 1 and 3 slots of 4 KiB, the last
    with a GSO extra slot), then received (a 2-slot chain with an extra, a 1-slot frame)."""
    counters = NetfrontStats()
    tx = TxPair()
    tx.core.counters = counters
    tx.send(b"a" * 60)
    tx.send(b"b" * 1514)
    tx.send(b"c" * 4096)
    tx.send(b"d" * 9000, gso=NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV6, 0))
    tx.backend_take()
    tx.core.collect()
    rx = RxPair()
    rx.core.counters = counters
    base = rx.core.ring.rsp_cons & 255
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV6, 0)
    _respond(
        rx,
        NetifRxResponse(base, 0, NETRXF_extra_info | NETRXF_more_data, 4096),
        encode_extra(gso),
        NetifRxResponse(base + 2, 0, 0, 904),
    )
    rx.pump()
    rx.deliver(b"e" * 100)
    rx.pump()
    return counters


def test_tx_and_rx_counters_of_fixed_traffic_are_their_arithmetic() -> None:
    counts = _counted_traffic()
    assert counts == _counted_traffic()  # exact: the same every run
    assert (counts.tx_packets, counts.tx_bytes) == (4, 60 + 1514 + 4096 + 9000)
    assert counts.tx_slots == 1 + 1 + 1 + (3 + 1)
    assert (counts.rx_packets, counts.rx_bytes, counts.rx_slots) == (2, 5000 + 100, 3 + 1)
    assert counts.tx_errors == counts.tx_dropped == counts.rx_errors == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=300))
def test_rx_garbage_responses_never_crash(responses: list[bytes]) -> None:
    pair = RxPair()
    for data in responses:
        if pair.back.unconsumed_requests() == 0:
            pair.back.push_responses()
            pair.pump()
        pair.back.take_requests(1)
        pair.back.put_response(data)
    pair.back.push_responses()
    pair.pump()
    for frame in pair.got:
        assert frame.frame and len(frame.frame) <= MAX_RX_SLOTS * GRANULE
