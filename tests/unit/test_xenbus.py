"""The xenbus reaction tables: legality, Linux's order, and convergence under coalesced watches."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import (
    Action,
    Closed,
    Closing,
    Connected,
    DeviceClass,
    DeviceId,
    Initialised,
    Initialising,
    InitWait,
    Unknown,
    XenbusState,
    backend_reaction,
    backend_start,
    frontend_reaction,
    parse_state,
)

STATES = list(XenbusState)


def test_state_values_match_xenbus_h() -> None:
    assert [int(s) for s in STATES] == list(range(9))
    assert Connected.short == "Connected"


@pytest.mark.parametrize(
    ("raw", "state"),
    [(b"4", Connected), ("6\n", Closed), (None, Unknown), (b"", Unknown), (b"x", Unknown)],
)
def test_parse_state(raw: bytes | str | None, state: XenbusState) -> None:
    assert parse_state(raw) == state


def test_paths() -> None:
    dev = DeviceId("vbd", frontend_domid=3, backend_domid=0, devid=51712)
    assert dev.backend == "/local/domain/0/backend/vbd/3/51712"
    assert dev.frontend == "/local/domain/3/device/vbd/51712"
    assert xenbus.xvd_number(0) == 51712 and xenbus.xvd_name(1) == "xvdb"


@pytest.mark.parametrize("cls", ["vbd", "vif"])
def test_linux_handshake_order(cls: DeviceClass) -> None:
    be = backend_start(Initialising)
    assert be.action is Action.ADVERTISE and be.next_state == InitWait
    fe = frontend_reaction(cls, Initialising, InitWait)
    assert fe is not None and fe.action is Action.SETUP
    # vbd goes through Initialised; netfront goes straight to Connected.
    assert fe.next_state == (Initialised if cls == "vbd" else Connected)
    be2 = backend_reaction(InitWait, fe.next_state)
    assert be2 is not None and be2.action is Action.CONNECT and be2.next_state == Connected
    fe2 = frontend_reaction(cls, fe.next_state, Connected)
    if cls == "vbd":
        assert fe2 is not None and fe2.action is Action.CONNECT and fe2.next_state == Connected
        capacity = frontend_reaction(cls, Connected, Connected)
        assert capacity is not None and capacity.action is Action.CAPACITY
        assert capacity.next_state is None
    else:
        assert fe2 is None


def test_close_order() -> None:
    # frontend Closing → backend Closing → frontend Closed → backend Closed
    assert backend_reaction(Connected, Closing) == xenbus.Reaction(Action.CLOSE, Closing)
    assert frontend_reaction("vbd", Closing, Closing) == xenbus.Reaction(Action.CLOSE, Closed)
    assert backend_reaction(Closing, Closed) == xenbus.Reaction(Action.CLOSE, Closed)
    # reconnect: frontend back to Initialising, backend back to InitWait
    assert backend_reaction(Closed, Initialising) == xenbus.Reaction(Action.RESET, InitWait)


@given(
    role=st.sampled_from(["frontend", "backend"]),
    cls=st.sampled_from(["vbd", "vif"]),
    me=st.sampled_from(STATES),
    peer=st.sampled_from(STATES),
)
def test_every_pair_gives_a_legal_state_or_nothing(
    role: str, cls: DeviceClass, me: XenbusState, peer: XenbusState
) -> None:
    if role == "frontend":
        r = frontend_reaction(cls, me, peer)
    else:
        r = backend_reaction(me, peer)
    if r is None:
        return
    assert isinstance(r.action, Action)
    if r.next_state is not None:
        # Drivers never move to Unknown or the Reconfigure states, and never "react" in place
        # except CAPACITY.
        assert r.next_state in (Initialising, InitWait, Initialised, Connected, Closing, Closed)
        assert r.next_state != me or (r.action is Action.CLOSE and me in (Closing, Closed))


@dataclass
class Device:
    """Both ends of one device, with ring generations to check who is attached to what."""

    cls: DeviceClass
    fe: XenbusState = Initialising
    be: XenbusState = Initialising
    fe_rings: int = 0  # generation of the rings the frontend published
    be_mapped: int | None = None  # generation the backend has mapped
    be_started: bool = False

    def backend_step(self) -> None:
        if not self.be_started:
            r = backend_start(self.fe)
            self.be_started = True
        else:
            r = backend_reaction(self.be, self.fe)
            if r is None:
                return
        if r.action is Action.CONNECT:
            self.be_mapped = self.fe_rings
        elif r.action in (Action.CLOSE, Action.RESET, Action.ADVERTISE):
            self.be_mapped = None
        if r.next_state is not None:
            self.be = r.next_state

    def frontend_step(self) -> None:
        r = frontend_reaction(self.cls, self.fe, self.be)
        if r is None:
            return
        if r.action is Action.SETUP:
            self.fe_rings += 1
        if r.next_state is not None:
            self.fe = r.next_state

    def backend_restart(self) -> None:
        self.be_started = False
        self.be_mapped = None

    def frontend_restart(self) -> None:
        self.fe = Initialising


@settings(max_examples=300)
@given(
    cls=st.sampled_from(["vbd", "vif"]),
    chaos=st.lists(st.sampled_from(["be", "fe", "be_restart", "fe_restart"]), max_size=40),
    order=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_handshake_converges_after_any_restarts(
    cls: DeviceClass, chaos: list[str], order: list[bool]
) -> None:
    """Whatever happened before (restarts, coalesced watches), fair steps reach Connected on both
    ends with the backend attached to the frontend's current rings, and stay there."""
    dev = Device(cls)
    actions = {
        "be": dev.backend_step,
        "fe": dev.frontend_step,
        "be_restart": dev.backend_restart,
        "fe_restart": dev.frontend_restart,
    }
    for step in chaos:
        actions[step]()
    for backend_first in order:  # arbitrary interleaving, each end gets a turn per round
        if backend_first:
            dev.backend_step()
            dev.frontend_step()
        else:
            dev.frontend_step()
            dev.backend_step()
    assert (dev.fe, dev.be) == (Connected, Connected)
    assert dev.be_mapped == dev.fe_rings
    before = (dev.fe, dev.be, dev.fe_rings, dev.be_mapped)
    dev.backend_step()
    dev.frontend_step()
    assert (dev.fe, dev.be, dev.fe_rings, dev.be_mapped) == before
