"""xenstored's watch-event seam (`ServerConfig.event_faults`) and its bound, driven through
the server's delivery step with a fake connection (no sockets), and the fault agent's
`XsFaultSet.on_event` (delay, duplicate, drop, flood) that implements it in a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from tests.unit.faults_helpers import Clock, fault
from xenpv.faults.control import Control, RunConfig
from xenpv.faults.xsagent import XsFaultSet, apply
from xenpv.xenstore.server import (
    EventVerdict,
    ServerConfig,
    XenstoreServer,
    _Conn,
    open_store,
)
from xenpv.xenstore.wire import Message, XsType

GUEST, OTHER = 2, 3


def _event(path: str = "/local/domain/2/data/x") -> Message:
    return Message(XsType.XS_WATCH_EVENT, 0, 0, path.encode() + b"\0tok\0")


class Fixed:
    """A seam that answers every event of domain GUEST with one verdict."""

    def __init__(self, verdict: EventVerdict | None) -> None:
        self.verdict = verdict
        self.seen: list[int] = []

    def on_event(self, domid: int, msg: Message) -> EventVerdict | None:
        self.seen.append(domid)
        return self.verdict if domid == GUEST else None


def _server(tmp_path: Path, seam: Any, max_events: int = 16) -> tuple[XenstoreServer, Any]:
    store, journal = open_store(tmp_path / "data")
    config = ServerConfig(
        str(tmp_path / "sock"), tmp_path, max_queued_events=max_events, event_faults=seam
    )
    return XenstoreServer(store, journal, config), journal


def _conn(server: XenstoreServer, cid: int, domid: int) -> _Conn:
    conn = _Conn(cid, domid, stream=None)  # type: ignore[arg-type]  # never written here
    server._conns[cid] = conn
    return conn


def test_drop_and_duplicate_hit_only_the_target_domain(tmp_path: Path) -> None:
    seam = Fixed(EventVerdict(drop=True))
    server, journal = _server(tmp_path, seam)
    try:
        guest, other, dom0 = _conn(server, 1, GUEST), _conn(server, 2, OTHER), _conn(server, 3, 0)
        server._deliver([(1, _event()), (2, _event()), (3, _event())], [])
        assert guest.queue == [] and len(other.queue) == 1 and len(dom0.queue) == 1
        assert 0 not in seam.seen  # dom0's events never reach the seam
        seam.verdict = EventVerdict(copies=2)
        server._deliver([(1, _event())], [])
        assert guest.queue == [_event().encode()] * 2 and guest.queued_events == 2
    finally:
        journal.close()


def test_a_flood_is_bounded_per_connection_and_spares_the_others(tmp_path: Path) -> None:
    server, journal = _server(tmp_path, Fixed(EventVerdict(copies=100_000)), max_events=16)
    try:
        guest, other = _conn(server, 1, GUEST), _conn(server, 2, OTHER)
        limit = server._event_limit(GUEST)
        server._deliver([(1, _event()), (2, _event())], [])
        assert len(guest.queue) == limit  # the bound holds for copies: memory stays bounded
        assert server.dropped_events == 100_000 - limit
        assert len(other.queue) == 1  # another domain still gets its event
        reply = Message(XsType.XS_WRITE, 9, 0, b"OK\0")
        server._deliver([(1, reply)], [])
        assert guest.queue[-1] == reply.encode()  # replies are never dropped
    finally:
        journal.close()


async def test_a_delayed_event_is_held_then_queued_within_the_bound(tmp_path: Path) -> None:
    server, journal = _server(tmp_path, Fixed(EventVerdict(delay=0.05, copies=2)))
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                server._nursery = nursery
                guest = _conn(server, 1, GUEST)
                server._deliver([(1, _event())], [])
                assert guest.queue == [] and guest.held_events == 2
                while not guest.queue:
                    await guest.wake.wait()
                    guest.wake = trio.Event()
                assert guest.queue == [_event().encode()] * 2 and guest.held_events == 0
    finally:
        journal.close()


def _faults(tmp_path: Path, *faults: Any, clock: Clock | None = None) -> XsFaultSet:
    config = ServerConfig(str(tmp_path / "sock"), tmp_path)
    run = RunConfig(0.0, str(tmp_path), 1, {"backend": 1, "guest4k": GUEST, "g2": OTHER}, {})
    current = apply(config, None, Control(run, tuple(faults)))
    assert current is not None and config.event_faults is current
    assert config.faults is None  # no request fault active: that seam stays free
    if clock is not None:
        current.clock = clock
    return current


def test_agent_watch_faults_per_domain(tmp_path: Path) -> None:
    drop = fault("xenstore.watch-drop", "domain:guest4k")
    faults = _faults(tmp_path, drop)
    verdict = faults.on_event(GUEST, _event())
    assert verdict is not None and verdict.drop
    assert faults.on_event(OTHER, _event()) is None
    assert faults.on_event(0, _event()) is None
    dup = fault("xenstore.watch-duplicate", "xenstored", "f1.0")
    delay = fault("xenstore.watch-delay", "domain:g2", "f2.0", delay=0.3)
    faults = _faults(tmp_path, dup, delay)
    both = faults.on_event(OTHER, _event())
    assert both is not None and both.copies == 2 and both.delay == 0.3
    only_dup = faults.on_event(GUEST, _event())
    assert only_dup is not None and only_dup.copies == 2 and only_dup.delay == 0


def test_agent_flood_follows_its_rate(tmp_path: Path) -> None:
    clock = Clock()
    flood = fault("xenstore.watch-flood", "domain:guest4k", rate=1000.0)
    faults = _faults(tmp_path, flood, clock=clock)
    assert faults.on_event(GUEST, _event()) is None  # nothing accrued yet: sent once
    clock.tick(0.5)
    verdict = faults.on_event(GUEST, _event())
    assert verdict is not None and verdict.copies == 501  # the event + 0.5 s at 1000/s
    clock.tick(60.0)
    capped = faults.on_event(GUEST, _event())
    assert capped is not None and capped.copies == 1001  # at most a second's worth at once
    assert faults.on_event(OTHER, _event()) is None


def test_agent_clears_the_event_seam_when_no_fault_is_listed(tmp_path: Path) -> None:
    config = ServerConfig(str(tmp_path / "sock"), tmp_path)
    run = RunConfig(0.0, str(tmp_path), 1, {"guest4k": GUEST}, {})
    current = apply(config, None, Control(run, (fault("xenstore.watch-drop", "xenstored"),)))
    assert config.event_faults is current
    apply(config, current, Control(run, ()))
    assert config.event_faults is None and config.faults is None
