"""The learning switch core (sans-IO) and its trio edge."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.switch import (
    DEFAULT_AGEING_TIME,
    LiveSwitch,
    Switch,
    SwitchError,
    format_mac,
)

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, n >> 8, n & 0xFF])  # locally administered unicast


def frame(dst: bytes, src: bytes, payload: bytes = b"x" * 46) -> bytes:
    return dst + src + b"\x08\x00" + payload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def three_ports(**kw: object) -> Switch[str]:
    sw: Switch[str] = Switch(**kw)  # type: ignore[arg-type]
    for p in ("a", "b", "c"):
        sw.add_port(p)
    return sw


def test_learns_floods_then_forwards() -> None:
    sw = three_ports()
    f1 = frame(BCAST, mac(1))
    assert sw.receive("a", f1) == [("b", f1), ("c", f1)]
    assert sw.lookup(mac(1)) == "a"
    f2 = frame(mac(1), mac(2))
    assert sw.receive("b", f2) == [("a", f2)]  # known: exactly one port
    f3 = frame(mac(2), mac(1))
    assert sw.receive("a", f3) == [("b", f3)]
    f4 = frame(mac(9), mac(1))
    assert sw.receive("a", f4) == [("b", f4), ("c", f4)]  # unknown unicast floods
    assert sw.counters("a").rx_frames == 3 and sw.counters("a").tx_frames == 1
    assert sw.counters("c").tx_frames == 2 and sw.counters("c").tx_bytes == 2 * len(f1)
    assert [(format_mac(e.mac), e.port) for e in sw.fdb()] == [
        ("02:00:00:00:00:02", "b"),
        ("02:00:00:00:00:01", "a"),
    ]


def test_multicast_floods_and_link_local_stays() -> None:
    sw = three_ports()
    ipv6_mcast = frame(bytes.fromhex("333300000001"), mac(1))
    assert [p for p, _ in sw.receive("a", ipv6_mcast)] == ["b", "c"]
    stp = frame(bytes.fromhex("0180c2000000"), mac(1))
    assert [p for p, _ in sw.receive("a", stp)] == ["b", "c"]  # STP off: BPDUs flood
    for last in (0x01, 0x02, 0x03, 0x0E):
        assert sw.receive("a", frame(bytes.fromhex("0180c20000") + bytes([last]), mac(1))) == []
    assert sw.drops.link_local == 4
    assert [p for p, _ in sw.receive("a", frame(bytes.fromhex("0180c2000010"), mac(1)))] == [
        "b",
        "c",
    ]


def test_bad_frames_are_dropped_and_counted() -> None:
    sw = three_ports()
    assert sw.receive("a", b"") == []
    assert sw.receive("a", BCAST + mac(1) + b"\x08") == []  # 13 bytes
    assert sw.receive("a", frame(BCAST, bytes(6))) == []  # zero source
    assert sw.receive("a", frame(mac(2), bytes.fromhex("010000000001"))) == []  # group source
    assert sw.drops.runt == 2 and sw.drops.bad_source == 2
    assert sw.counters("a").rx_dropped == 4 and sw.counters("a").rx_frames == 4
    assert sw.fdb() == []
    assert [p for p, _ in sw.receive("a", BCAST + mac(1) + b"\x08\x00")] == ["b", "c"]  # 14 ok


def test_never_sent_back_out_of_the_ingress_port() -> None:
    sw = three_ports()
    sw.receive("a", frame(BCAST, mac(1)))
    sw.receive("a", frame(BCAST, mac(2)))
    assert sw.receive("a", frame(mac(2), mac(1))) == []  # both on port a
    assert sw.drops.same_port == 1
    assert sw.receive("a", frame(mac(1), mac(1))) == []


def test_mac_moves_between_ports() -> None:
    sw = three_ports()
    sw.receive("a", frame(BCAST, mac(1)))
    sw.receive("c", frame(BCAST, mac(1)))  # the guest migrated
    assert sw.lookup(mac(1)) == "c"
    f = frame(mac(1), mac(2))
    assert sw.receive("b", f) == [("c", f)]


def test_entries_age_out_unless_refreshed() -> None:
    clock = Clock()
    sw = three_ports(clock=clock)
    sw.receive("a", frame(BCAST, mac(1)))
    sw.receive("b", frame(BCAST, mac(2)))
    clock.now += DEFAULT_AGEING_TIME - 1
    sw.receive("b", frame(BCAST, mac(2)))  # refresh mac 2 only
    clock.now += 1
    assert sw.lookup(mac(1)) is None and sw.lookup(mac(2)) == "b"
    f = frame(mac(1), mac(3))
    assert [p for p, _ in sw.receive("c", f)] == ["a", "b"]  # aged: flooded again
    assert sw.expire() == 1
    assert {e.mac for e in sw.fdb()} == {mac(2), mac(3)}
    clock.now += DEFAULT_AGEING_TIME
    assert sw.expire() == 2 and sw.fdb() == []


def test_ageing_zero_is_a_hub() -> None:
    sw = three_ports(ageing_time=0.0, clock=Clock())
    sw.receive("a", frame(BCAST, mac(1)))
    assert [p for p, _ in sw.receive("b", frame(mac(1), mac(2)))] == ["a", "c"]


def test_table_is_bounded_and_forgets_the_least_recently_seen() -> None:
    clock = Clock()
    sw = three_ports(clock=clock, max_entries=3)
    for n in (1, 2, 3):
        clock.now += 1
        sw.receive("a", frame(BCAST, mac(n)))
    clock.now += 1
    sw.receive("a", frame(BCAST, mac(1)))  # mac 1 is now the most recent
    sw.receive("b", frame(BCAST, mac(4)))
    assert [e.mac for e in sw.fdb()] == [mac(3), mac(1), mac(4)]
    assert sw.lookup(mac(2)) is None


def test_removing_a_port_forgets_its_addresses() -> None:
    sw = three_ports()
    sw.receive("a", frame(BCAST, mac(1)))
    sw.receive("b", frame(BCAST, mac(2)))
    sw.remove_port("a")
    assert sw.ports == ("b", "c") and sw.lookup(mac(1)) is None and sw.lookup(mac(2)) == "b"
    with pytest.raises(SwitchError, match="no port 'a'"):
        sw.receive("a", frame(BCAST, mac(1)))
    with pytest.raises(SwitchError, match="already attached"):
        sw.add_port("b")
    with pytest.raises(SwitchError):
        Switch(max_entries=0)


# --- properties -----------------------------------------------------------------------------

PORTS = ("p0", "p1", "p2", "p3")
event = st.one_of(
    st.tuples(
        st.just("frame"),
        st.sampled_from(PORTS),
        st.integers(0, 7),  # source station
        st.one_of(st.none(), st.integers(0, 9)),  # destination: None = broadcast
    ),
    st.tuples(st.just("remove"), st.sampled_from(PORTS), st.just(0), st.just(None)),
    st.tuples(st.just("add"), st.sampled_from(PORTS), st.just(0), st.just(None)),
    st.tuples(st.just("tick"), st.just(""), st.sampled_from([1, 100, 299, 300]), st.just(None)),
)


@settings(max_examples=300)
@given(events=st.lists(event, max_size=60))
def test_forwarding_matches_a_model_and_never_reflects(
    events: list[tuple[str, str, int, int | None]],
) -> None:
    clock = Clock()
    sw: Switch[str] = Switch(clock=clock)
    ports: list[str] = []
    learned: dict[bytes, tuple[str, float]] = {}  # mac -> (port, last seen)

    def model() -> dict[bytes, str]:
        return {m: p for m, (p, t) in learned.items() if t + DEFAULT_AGEING_TIME > clock.now}

    for kind, port, src, dst in events:
        if kind == "tick":
            clock.now += src
            continue
        if kind == "add":
            if port not in ports:
                sw.add_port(port)
                ports.append(port)
            continue
        if port not in ports:
            continue
        if kind == "remove":
            sw.remove_port(port)
            ports.remove(port)
            learned = {m: v for m, v in learned.items() if v[0] != port}
            continue
        dst_mac = BCAST if dst is None else mac(dst)
        f = frame(dst_mac, mac(src), bytes([src]) * 50)
        learned[mac(src)] = (port, clock.now)
        before = sum(sw.counters(p).tx_frames for p in ports)
        out = sw.receive(port, f)
        assert sum(sw.counters(p).tx_frames for p in ports) == before + len(out)
        out_ports = [p for p, _ in out]
        assert port not in out_ports
        assert all(g is f for _, g in out)
        assert len(set(out_ports)) == len(out_ports)
        owner = model().get(dst_mac)
        if dst is None or owner is None:
            assert out_ports == [p for p in ports if p != port]
        elif owner == port:
            assert out_ports == []
        else:
            assert out_ports == [owner]  # exactly one port for a learned address
        assert {e.mac: e.port for e in sw.fdb()} == model()


@settings(max_examples=200)
@given(data=st.binary(max_size=40), port=st.sampled_from(("a", "b", "c")))
def test_arbitrary_bytes_never_crash_or_reflect(data: bytes, port: str) -> None:
    sw = three_ports()
    out = sw.receive(port, data)
    assert all(p != port for p, _ in out)
    assert len(data) >= 14 or out == []


# --- trio edge ------------------------------------------------------------------------------


async def test_live_switch_delivers_with_meta_and_ends_on_detach() -> None:
    with trio.fail_after(5):
        live: LiveSwitch[str] = LiveSwitch()
        a, b, c = live.attach("vif1.0"), live.attach("vif2.0"), live.attach("tap0")
        hello = frame(BCAST, mac(1))
        assert a.send(hello, "gso-none") == 2
        assert await b.receive() == (hello, "gso-none")
        assert await c.receive() == (hello, "gso-none")
        reply = frame(mac(1), mac(2))
        assert b.send(reply) == 1
        assert await a.receive() == (reply, None)
        live.detach("tap0")
        with pytest.raises(trio.EndOfChannel):
            await c.receive()
        assert a.send(frame(BCAST, mac(1))) == 1
        with pytest.raises(SwitchError, match="detached"):
            c.send(hello)

        async def drain() -> list[bytes]:
            return [f async for f, _ in b]

        got: list[bytes] = []

        async def collect() -> None:
            got.extend(await drain())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            await trio.testing.wait_all_tasks_blocked()
            live.detach("vif2.0")
        assert got == [frame(BCAST, mac(1))]


async def test_a_full_egress_queue_drops_without_blocking_the_sender() -> None:
    with trio.fail_after(5):
        live: LiveSwitch[None] = LiveSwitch(queue_depth=4)
        a, slow, fast = live.attach("a"), live.attach("slow"), live.attach("fast")
        sent = 0
        for i in range(10):
            f = frame(BCAST, mac(1), bytes([i]) * 46)
            sent += a.send(f)
            await fast.receive()  # this one keeps up
        assert sent == 10 + 4
        assert live.core.counters("slow").tx_dropped == 6
        assert live.core.counters("slow").tx_frames == 4
        assert live.core.drops.queue_full == 6
        got = await slow.receive_batch(limit=3)
        got += await slow.receive_batch()
        assert [f[14] for f, _ in got] == [0, 1, 2, 3]  # in order, the tail was dropped
        live.detach("slow")
        with pytest.raises(trio.EndOfChannel):
            await slow.receive_batch()


async def test_direct_delivery_keeps_order_and_falls_back_to_the_queue() -> None:
    """`set_direct`: frames go straight to the callback while the port's queue is empty; one
    it refuses is queued, and so is every later frame until the queue has been drained."""
    with trio.fail_after(5):
        live: LiveSwitch[int] = LiveSwitch(queue_depth=8)
        a, b = live.attach("a"), live.attach("b")
        taken: list[int] = []
        accept = True

        def deliver(f: bytes, meta: int | None) -> bool:
            if accept:
                assert meta is not None
                taken.append(meta)
            return accept

        b.set_direct(deliver)
        for n in range(3):
            assert a.send(frame(BCAST, mac(1)), n) == 1
        assert taken == [0, 1, 2]
        accept = False
        assert a.send(frame(BCAST, mac(1)), 3) == 1  # refused: queued
        accept = True
        assert a.send(frame(BCAST, mac(1)), 4) == 1  # behind a queued frame: queued too
        assert taken == [0, 1, 2]
        assert [m for _, m in await b.receive_batch()] == [3, 4]
        assert a.send(frame(BCAST, mac(1)), 5) == 1  # drained: direct again
        assert taken == [0, 1, 2, 5]
        assert live.core.counters("b").tx_frames == 6
        b.set_direct(None)
        a.send(frame(BCAST, mac(1)), 6)
        assert (await b.receive())[1] == 6 and taken == [0, 1, 2, 5]
