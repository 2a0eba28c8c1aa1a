"""Xenbus: device paths, states, and the split-driver handshake as data.

Theory of operation
-------------------
Each end of a PV device publishes its state in xenstore (`<its dir>/state`) and watches the other
end's. Whenever a watch fires, a driver reads the other end's *current* state (watches coalesce:
intermediate values may never be seen) and looks up what to do in the reaction tables below,
keyed by (role, device class, own state, other end's state). A reaction names an action for the
driver to perform (publish ring keys, map rings, tear down, ...) and the state to switch to once
that action is done. Nothing here touches xenstore; `xenpv.xenbus.handshake` does.

The tables follow Linux (xen-blkback/xenbus.c `frontend_changed`, xen-blkfront.c
`blkback_changed`, xen-netback/xenbus.c, xen-netfront.c `netback_changed`):

vbd:  backend InitWait → frontend SETUP → Initialised → backend CONNECT → Connected
      → frontend CONNECT → Connected. A later backend re-write of Connected: CAPACITY.
vif:  backend InitWait → frontend SETUP → straight to Connected → backend CONNECT → Connected.
close: frontend Closing → backend Closing → frontend Closed → backend Closed.
unplug (the toolstack's, as libxl does it): backend `online` = 0 and backend state Closing
      (written by the toolstack) → frontend Closed → backend Closed → the toolstack removes
      both directories. A backend whose `online` is 0 never RESETs (Linux `frontend_changed`
      unregisters an offline device at Closed instead).
reconnect after a close: frontend Initialising (once the backend is Closed) → backend InitWait.

Linux never restarts a driver process, so where xenpv needs that it uses only the transitions
above plus two rules, chosen so that each step waits for a state the other end holds stably
(watches coalesce, so a transient value must never be relied on):
- a backend process that (re)starts and finds a device whose frontend is past Initialising
  writes Closed (`backend_start`): the frontend tears down its rings, keeping unfinished
  requests, as Linux blkfront keeps them across resume (`blkif_recover`);
- a frontend that is Closed and sees the backend Closed REINITs to Initialising when it still
  wants the device; the backend RESETs to InitWait and the handshake runs again. A restarted
  frontend simply starts at Initialising; a Connected backend RESETs on seeing that.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Literal

from xenpv.xenbus.keys import parse_uint

Role = Literal["frontend", "backend"]
DeviceClass = Literal["vbd", "vif"]
DEVICE_CLASSES: tuple[DeviceClass, ...] = ("vbd", "vif")


class XenbusState(IntEnum):
    """enum xenbus_state (io/xenbus.h)."""

    XenbusStateUnknown = 0
    XenbusStateInitialising = 1
    XenbusStateInitWait = 2
    XenbusStateInitialised = 3
    XenbusStateConnected = 4
    XenbusStateClosing = 5
    XenbusStateClosed = 6
    XenbusStateReconfiguring = 7
    XenbusStateReconfigured = 8

    @property
    def short(self) -> str:
        return self.name.removeprefix("XenbusState")


Unknown = XenbusState.XenbusStateUnknown
Initialising = XenbusState.XenbusStateInitialising
InitWait = XenbusState.XenbusStateInitWait
Initialised = XenbusState.XenbusStateInitialised
Connected = XenbusState.XenbusStateConnected
Closing = XenbusState.XenbusStateClosing
Closed = XenbusState.XenbusStateClosed


def parse_state(raw: bytes | str | None) -> XenbusState:
    """Decode a `state` node as Linux's xenbus_read_driver_state does: missing or junk → Unknown."""
    try:
        return XenbusState(parse_uint(raw, "state", default=Unknown))
    except ValueError:  # a number that is no state
        return Unknown


class Action(Enum):
    """What a driver must do before switching to a reaction's next state."""

    ADVERTISE = "advertise"  # backend: write feature keys
    SETUP = "setup"  # frontend: allocate/grant rings, bind event channels, publish keys
    CONNECT = "connect"  # backend: map rings, publish device info; frontend: read features
    CAPACITY = "capacity"  # frontend vbd: the backend re-wrote Connected, re-read `sectors`
    RESET = "reset"  # backend: tear down what is left, re-advertise for a new connection
    CLOSE = "close"  # either end: tear down rings and event channels (frontend keeps requests)
    REINIT = "reinit"  # frontend: start over at Initialising (only if it still wants the device)


@dataclass(frozen=True, slots=True)
class Reaction:
    action: Action
    next_state: XenbusState | None  # None: no state change (e.g. CAPACITY)


# Backend reactions, keyed by (own state, frontend state). Same for vbd and vif.
_BACKEND: dict[tuple[XenbusState, XenbusState], Reaction] = {}
for _me in (Closed, Closing, Connected):
    _BACKEND[(_me, Initialising)] = Reaction(Action.RESET, InitWait)
for _fe in (Initialised, Connected):  # Linux connects on either: a watch may skip Initialised
    _BACKEND[(InitWait, _fe)] = Reaction(Action.CONNECT, Connected)
for _me in (InitWait, Connected):
    _BACKEND[(_me, Closing)] = Reaction(Action.CLOSE, Closing)
for _me in (InitWait, Connected, Closing):
    _BACKEND[(_me, Closed)] = Reaction(Action.CLOSE, Closed)
    _BACKEND[(_me, Unknown)] = Reaction(Action.CLOSE, Closed)

# Frontend reactions, keyed by (device class, own state, backend state).
_FRONTEND: dict[tuple[DeviceClass, XenbusState, XenbusState], Reaction] = {}
_READY: tuple[tuple[DeviceClass, XenbusState], ...] = (("vbd", Initialised), ("vif", Connected))
for _cls, _ready in _READY:
    _FRONTEND[(_cls, Initialising, InitWait)] = Reaction(Action.SETUP, _ready)
    for _me in (Initialised, Connected, Closing):
        for _be in (Closing, Closed):
            _FRONTEND[(_cls, _me, _be)] = Reaction(Action.CLOSE, Closed)
    _FRONTEND[(_cls, Closed, Closed)] = Reaction(Action.REINIT, Initialising)
_FRONTEND[("vbd", Initialised, Connected)] = Reaction(Action.CONNECT, Connected)
_FRONTEND[("vbd", Connected, Connected)] = Reaction(Action.CAPACITY, None)


def backend_start(frontend: XenbusState) -> Reaction:
    """What a backend does when it (re)starts and finds a device whose frontend is in `frontend`."""
    if frontend in (Unknown, Initialising):
        return Reaction(Action.ADVERTISE, InitWait)
    # Closed: wait for the frontend to REINIT. Anything else: rings left from a previous backend
    # instance, whose private ring state is lost; make the frontend start over.
    return Reaction(Action.CLOSE, Closed)


def backend_reaction(
    me: XenbusState, frontend: XenbusState, *, online: bool = True
) -> Reaction | None:
    """What a backend does when it sees the frontend in `frontend` while itself in `me`.
    A device the toolstack took offline (`online` = 0: it is being unplugged) is not set up
    again: the toolstack removes it once the backend is Closed."""
    reaction = _BACKEND.get((me, frontend))
    if reaction is not None and reaction.action is Action.RESET and not online:
        return None
    return reaction


def parse_online(raw: bytes | str | None) -> bool:
    """A backend's `online` node: missing means online (the toolstack writes 0 to unplug)."""
    if raw is None:
        return True
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    return text.strip() != "0"


def frontend_reaction(cls: DeviceClass, me: XenbusState, backend: XenbusState) -> Reaction | None:
    """What a frontend of class `cls` in state `me` does on seeing the backend in `backend`.

    A REINIT reaction is only taken by a frontend that still wants the device.
    """
    return _FRONTEND.get((cls, me, backend))


# --- paths -----------------------------------------------------------------------------------


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def backend_dir(backend_domid: int, cls: DeviceClass, frontend_domid: int, devid: int) -> str:
    """`/local/domain/<be>/backend/<vbd|vif>/<fe-domid>/<devid>`."""
    return f"{domain_path(backend_domid)}/backend/{cls}/{frontend_domid}/{devid}"


def frontend_dir(frontend_domid: int, cls: DeviceClass, devid: int) -> str:
    """`/local/domain/<fe>/device/<vbd|vif>/<devid>`."""
    return f"{domain_path(frontend_domid)}/device/{cls}/{devid}"


@dataclass(frozen=True, slots=True)
class DeviceId:
    """One PV device: both ends' domids, its class and its device id."""

    cls: DeviceClass
    frontend_domid: int
    backend_domid: int
    devid: int

    @property
    def backend(self) -> str:
        return backend_dir(self.backend_domid, self.cls, self.frontend_domid, self.devid)

    @property
    def frontend(self) -> str:
        return frontend_dir(self.frontend_domid, self.cls, self.devid)

    def __str__(self) -> str:
        return f"{self.cls}/{self.frontend_domid}/{self.devid}"


# vbd `virtual-device` numbers, Linux's encoding for xvd disks: (202 << 8) | (disk << 4).
XVD_MAJOR = 202


def xvd_number(disk_index: int) -> int:
    """The `virtual-device` value of xvd<a+index> (xvda = 51712), for up to 16 disks."""
    if not 0 <= disk_index < 16:
        raise ValueError("xvd disk index must be 0..15")
    return (XVD_MAJOR << 8) | (disk_index << 4)


def xvd_name(disk_index: int) -> str:
    return "xvd" + chr(ord("a") + disk_index)
