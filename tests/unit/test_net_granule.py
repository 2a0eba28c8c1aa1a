"""Grant granules on the vif (docs/granule-extension.md, netif): negotiation and the sans-IO
cores of netfront and netback joined over in-memory rings, for every granule order."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.keys import (
    FRONTEND_FLAGS,
    NetbackConfigError,
    advertise_keys,
    max_granule_order,
    parse_frontend,
)
from backends.netback.rx import RxCore as BackRx
from backends.netback.rx import RxFrame as BackRxFrame
from backends.netback.tx import TxCore as BackTx
from backends.netback.tx import TxFatal
from frontends.netfront.core import RxCore as FrontRx
from frontends.netfront.core import RxFrame as FrontRxFrame
from frontends.netfront.core import TxCore as FrontTx
from frontends.netfront.device import TX_ARENA_BYTES, tx_ids
from frontends.netfront.keys import (
    BACKEND_FEATURE_KEYS,
    QueueKeys,
    frontend_keys,
    negotiate_granule,
    parse_features,
    stale_keys,
)
from xenpv import granule
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.netif import (
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NetifGsoExtra,
    NETRXF_csum_blank,
)
from xenpv.abi.ring import BackRing, FrontRing

PAGE_SIZES = [4096, 16384, 65536]
ORDERS = list(range(granule.MAX_GRANULE_ORDER + 1))
QUEUE = QueueKeys(8, 9, 3, 3)


def _strings(keys: dict[str, int] | dict[str, str | int]) -> dict[str, str | None]:
    return {name: str(value) for name, value in keys.items()}


def negotiate(
    page_size: int, backend_max: int | None, cap: int | None
) -> tuple[int, dict[str, str | int], int]:
    """Both ends through their key codecs: (frontend's order, its keys, backend's accepted)."""
    advertised = _strings(advertise_keys(4, backend_max))
    features = parse_features({k: advertised.get(k) for k in BACKEND_FEATURE_KEYS})
    order = negotiate_granule(page_size, features, cap)
    keys = frontend_keys(
        [QUEUE],
        split_event_channels=False,
        granule_order=None if features.max_granule_order is None else order,
    )
    written = _strings(keys)
    flags = {name: written.get(name) for name in FRONTEND_FLAGS}
    queue = {name: written.get(name) for name in written if "ring-ref" in name or "event" in name}
    config = parse_frontend(flags, [queue], ["fe"], max_granule_order=backend_max)
    return order, keys, config.granule_order


@settings(max_examples=200)
@given(
    page_size=st.sampled_from(PAGE_SIZES),
    backend_max=st.none() | st.sampled_from(ORDERS),
    cap=st.none() | st.sampled_from(ORDERS),
)
def test_both_ends_always_agree(page_size: int, backend_max: int | None, cap: int | None) -> None:
    order, keys, accepted = negotiate(page_size, backend_max, cap)
    assert accepted == order
    assert order <= granule.page_order(page_size)
    assert order <= (backend_max or 0)
    if cap is not None:
        assert order <= cap
    if cap is None and backend_max is not None:  # as large as allowed
        assert order == min(granule.page_order(page_size), backend_max)
    # a backend without the extension gets no key; one with it always reads what was chosen
    assert (granule.FRONTEND_KEY in keys) == (backend_max is not None)
    if backend_max is not None:
        assert keys[granule.FRONTEND_KEY] == order


def test_old_backend_new_frontend_and_decline() -> None:
    assert negotiate(65536, None, None)[0] == 0  # no max-grant-granule-order: baseline
    order, keys, accepted = negotiate(65536, 4, 0)  # advertised, but the frontend declines
    assert order == accepted == keys[granule.FRONTEND_KEY] == 0
    assert negotiate(65536, 2, None)[0] == 2  # the backend's maximum bounds a 64K guest
    assert negotiate(4096, 4, None)[0] == 0  # a 4K guest: its page order


def _flags(**extra: str) -> dict[str, str | None]:
    flags: dict[str, str | None] = {name: None for name in FRONTEND_FLAGS}
    flags["request-rx-copy"] = "1"
    flags.update(extra)
    return flags


QUEUE_KEYS = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}


def test_old_frontend_on_new_backend_is_order_0() -> None:
    config = parse_frontend(_flags(), [QUEUE_KEYS], ["fe"], max_granule_order=4)
    assert (config.granule_order, config.granule) == (0, 4096)


def test_old_backend_ignores_the_frontend_key() -> None:
    flags = _flags(**{granule.FRONTEND_KEY: "4"})
    assert parse_frontend(flags, [QUEUE_KEYS], ["fe"]).granule_order == 0


@pytest.mark.parametrize(("raw", "backend_max"), [("3", 2), ("1", 0), ("4", 3)])
def test_order_above_backend_max_is_refused(raw: str, backend_max: int) -> None:
    flags = _flags(**{granule.FRONTEND_KEY: raw})
    with pytest.raises(NetbackConfigError) as info:
        parse_frontend(flags, [QUEUE_KEYS], ["fe"], max_granule_order=backend_max)
    message = str(info.value)
    assert granule.FRONTEND_KEY in message and granule.BACKEND_MAX_KEY in message
    assert f"{raw} exceeds" in message


@pytest.mark.parametrize("raw", ["5", "-1", "x", "", "+1", "99999999999"])  # %u: "1.0" is 1
def test_junk_order_is_refused(raw: str) -> None:
    flags = _flags(**{granule.FRONTEND_KEY: raw})
    with pytest.raises(NetbackConfigError, match=granule.FRONTEND_KEY):
        parse_frontend(flags, [QUEUE_KEYS], ["fe"], max_granule_order=4)


def test_backend_advertises_after_linux_keys_and_reads_the_toolstack_key_as_blkback() -> None:
    keys = advertise_keys(4, 2)
    assert list(keys)[-1] == granule.BACKEND_MAX_KEY and keys[granule.BACKEND_MAX_KEY] == 2
    assert granule.BACKEND_MAX_KEY not in advertise_keys(4)
    assert max_granule_order(None) == 4
    assert max_granule_order("0") == 0
    for junk in ("9", "junk", ""):  # a toolstack typo is refused, never guessed
        with pytest.raises(NetbackConfigError, match="xenpv-max-grant-granule-order"):
            max_granule_order(junk)


@pytest.mark.parametrize("raw", ["junk", "7", "-2"])
def test_frontend_reads_a_junk_backend_max_as_baseline(raw: str) -> None:
    features = parse_features({granule.BACKEND_MAX_KEY: raw, "feature-rx-copy": "1"})
    assert features.max_granule_order == 0
    assert negotiate_granule(65536, features, None) == 0


def test_stale_key_removed_before_a_new_connection() -> None:
    assert granule.FRONTEND_KEY in stale_keys(8)


def test_tx_arena_bounded() -> None:
    assert [tx_ids(256, granule.granule_size(o)) for o in ORDERS] == [256, 256, 256, 128, 64]
    assert all(
        tx_ids(256, granule.granule_size(o)) * granule.granule_size(o) <= TX_ARENA_BYTES
        for o in ORDERS
    )


# --- the cores joined over in-memory rings --------------------------------------------------

GREF_BASE = 1000


class TxPair:
    """netfront's TxCore → netback's TxCore; grant n names arena granule n - GREF_BASE."""

    def __init__(self, front_granule: int, back_granule: int) -> None:
        buffer = LocalBuffer(4096)
        ring = FrontRing(buffer, NETIF_TX_RING)
        self.granule = front_granule
        self.front = FrontTx(ring, front_granule, tx_ids(ring.nr_ents, front_granule))
        self.back = BackTx(BackRing(buffer, NETIF_TX_RING), granule=back_granule)
        self.arena = bytearray(self.front.nr_ids * front_granule)

    def send(self, frame: bytes, gso: NetifGsoExtra | None = None) -> tuple[bytes, int]:
        """The frame as netback copies it, and the number of data slots used."""
        pieces = self.front.plan(len(frame), gso)
        ids = self.front.alloc_ids(len(pieces))
        at = 0
        for slot_id, (_index, offset, size) in zip(ids, pieces, strict=True):
            start = slot_id * self.granule + offset
            self.arena[start : start + size] = frame[at : at + size]
            at += size
        self.front.put_packet(ids, [GREF_BASE + i for i in ids], pieces, gso=gso)
        self.front.push()
        (packet,) = self.back.take()
        out = bytearray(packet.size)
        for segment in packet.segments:
            assert segment.offset + segment.length <= self.back.granule  # never crosses
            base = (segment.gref - GREF_BASE) * self.granule + segment.offset
            out[segment.at : segment.at + segment.length] = self.arena[base : base + segment.length]
        self.back.complete(packet, True)
        self.back.push()
        assert len(self.front.collect()) == len(ids)
        return bytes(out), len(ids)


@settings(max_examples=60, deadline=None)
@given(order=st.sampled_from(ORDERS), size=st.integers(60, 65535), seed=st.integers(0, 99))
def test_tx_frames_intact_with_granules(order: int, size: int, seed: int) -> None:
    size_g = granule.granule_size(order)
    pair = TxPair(size_g, size_g)
    frame = random.Random(seed).randbytes(size)
    got, slots = pair.send(frame)
    assert got == frame
    assert slots == -(-size // size_g)  # slots split at granule boundaries, never 4 KiB


@pytest.mark.parametrize(("order", "slots"), [(0, 16), (2, 4), (4, 1)])
def test_64k_gso_frame_slot_count(order: int, slots: int) -> None:
    size_g = granule.granule_size(order)
    pair = TxPair(size_g, size_g)
    frame = random.Random(order).randbytes(65535)
    got, used = pair.send(frame, NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4))
    assert (got, used) == (frame, slots)
    assert pair.back.counters.tx_packets == 1
    assert pair.back.counters.tx_slots == slots + 1  # and the GSO extra slot


def test_netback_at_4k_rejects_a_slot_crossing_4k() -> None:
    """A frontend using granules the backend did not accept breaks the slot rule: fatal."""
    pair = TxPair(65536, 4096)
    with pytest.raises(TxFatal, match="Cross page boundary"):
        pair.send(bytes(9000))


class RxPair:
    """netback's RxCore → netfront's RxCore; rx buffer n is one granule, grant GREF_BASE + n."""

    def __init__(self, order: int) -> None:
        buffer = LocalBuffer(4096)
        ring = FrontRing(buffer, NETIF_RX_RING)
        self.granule = granule.granule_size(order)
        self.memory = bytearray(ring.nr_ents * self.granule)
        view = memoryview(self.memory)
        buffers = [view[n * self.granule : (n + 1) * self.granule] for n in range(ring.nr_ents)]
        grefs = [GREF_BASE + n for n in range(ring.nr_ents)]
        self.front = FrontRx(ring, buffers, grefs, self.granule)
        self.back = BackRx(BackRing(buffer, NETIF_RX_RING), can_sg=True, granule=self.granule)
        self.front.post()

    def deliver(self, frame: BackRxFrame) -> tuple[list[FrontRxFrame], list[int]]:
        placement = self.back.place(frame)
        lengths = []
        for segment in placement.segments:
            lengths.append(segment.length)
            base = (segment.gref - GREF_BASE) * self.granule
            self.memory[base : base + segment.length] = frame.data[
                segment.at : segment.at + segment.length
            ]
        self.back.complete(placement, [0] * len(placement.segments))
        self.back.push()
        got: list[FrontRxFrame] = []
        self.front.take(got.append)
        self.front.post()
        return got, lengths


@settings(max_examples=40, deadline=None)
@given(order=st.sampled_from(ORDERS), size=st.integers(60, 65535), seed=st.integers(0, 99))
def test_rx_frames_intact_with_granules(order: int, size: int, seed: int) -> None:
    pair = RxPair(order)
    data = random.Random(seed).randbytes(size)
    got, lengths = pair.deliver(BackRxFrame(data, 0))
    assert [f.frame for f in got] == [data]
    capacity = granule.netif_rx_slot_capacity(order)
    assert max(lengths) <= capacity <= 0x7FFF  # status is an int16_t
    assert len(lengths) == -(-size // capacity)


def test_rx_64k_gso_frame_with_64k_granules_chains_past_int16() -> None:
    pair = RxPair(4)
    data = random.Random(1).randbytes(65535)
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    got, lengths = pair.deliver(BackRxFrame(data, int(NETRXF_csum_blank), gso))
    assert lengths == [32767, 32767, 1]  # min(granule, 32767) per slot, chained with more_data
    (frame,) = got
    assert frame.frame == data and frame.csum_blank
    assert frame.gso is not None and frame.gso.size == 1448
    assert pair.front.counters.rx_errors == 0
