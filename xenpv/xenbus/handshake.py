"""Xenbus at the edge: state keys in xenstore and the loop that drives a device's handshake.

Every PV driver (blkfront/blkback/netfront/netback) runs `run_handshake` with an object that
knows how to perform the actions of `xenpv.xenbus.core`. The loop watches the other end's `state`
node, reads both ends' current states (watches coalesce, so the current value is what counts),
looks the pair up in the reaction tables, performs the action, and publishes the keys the action
produced together with the new state in one transaction, as Linux does with
`xenbus_transaction_start` around `ring-ref`/`event-channel`/`state`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import structlog

from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import Action, DeviceId, Reaction, XenbusState
from xenpv.xenbus.keys import ONLINE
from xenpv.xenstore.client import Transaction, XenstoreClient

log = structlog.get_logger()

KeyValues = Mapping[str, str | int | bytes]


def _encode(value: str | int | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


async def read_state(xs: XenstoreClient, directory: str) -> XenbusState:
    return xenbus.parse_state(await xs.try_read(f"{directory}/state"))


async def publish(
    xs: XenstoreClient,
    directory: str,
    keys: KeyValues,
    *,
    state: XenbusState | None = None,
) -> bool:
    """Write `keys` under `directory` and optionally switch `state`, in one transaction.

    Like Linux's `xenbus_switch_state`, refuses to resurrect a removed device: if the
    directory's `state` node is gone (the toolstack removed the device), nothing is written
    and False is returned.
    """

    async def body(tx: Transaction) -> bool:
        if await tx.try_read(f"{directory}/state") is None:
            return False
        for name, value in keys.items():
            await tx.write(f"{directory}/{name}", _encode(value))
        if state is not None:
            await tx.write(f"{directory}/state", str(int(state)).encode())
        return True

    return await xs.transact(body)


async def read_keys(xs: XenstoreClient, directory: str, names: list[str]) -> dict[str, str | None]:
    """Read several keys of one directory; a missing key reads as None."""
    out: dict[str, str | None] = {}
    for name in names:
        raw = await xs.try_read(f"{directory}/{name}")
        out[name] = None if raw is None else raw.decode("ascii", "replace")
    return out


class HandshakeDriver(Protocol):
    """What `run_handshake` needs from a driver: its device, its role, and its actions."""

    device: DeviceId
    role: xenbus.Role

    async def perform(self, action: Action) -> KeyValues | None:
        """Do `action`; return keys to publish with the state switch, or None to stay put
        (e.g. REINIT while the driver no longer wants the device)."""
        ...


def _dirs(driver: HandshakeDriver) -> tuple[str, str]:
    if driver.role == "frontend":
        return driver.device.frontend, driver.device.backend
    return driver.device.backend, driver.device.frontend


async def is_online(xs: XenstoreClient, device: DeviceId) -> bool:
    """False once the toolstack asked the device to go (backend `online` = 0)."""
    return xenbus.parse_online(await xs.try_read(f"{device.backend}/{ONLINE}"))


async def _react(
    xs: XenstoreClient, driver: HandshakeDriver, me: XenbusState, other: XenbusState
) -> Reaction | None:
    if driver.role == "frontend":
        return xenbus.frontend_reaction(driver.device.cls, me, other)
    reaction = xenbus.backend_reaction(me, other)
    if reaction is not None and reaction.action is Action.RESET:
        reaction = xenbus.backend_reaction(me, other, online=await is_online(xs, driver.device))
    return reaction


async def step(xs: XenstoreClient, driver: HandshakeDriver) -> Reaction | None:
    """Read both states once and take the reaction they call for, if any."""
    mine, other = _dirs(driver)
    me = await read_state(xs, mine)
    peer = await read_state(xs, other)
    reaction = await _react(xs, driver, me, peer)
    if reaction is None:
        return None
    return await _take(xs, driver, mine, me, peer, reaction)


async def _take(
    xs: XenstoreClient,
    driver: HandshakeDriver,
    mine: str,
    me: XenbusState,
    peer: XenbusState,
    reaction: Reaction,
) -> Reaction | None:
    keys = await driver.perform(reaction.action)
    if keys is None:
        return None
    log.info(
        "xenbus reaction",
        device=str(driver.device),
        role=driver.role,
        me=me.short,
        other=peer.short,
        action=reaction.action.value,
        next=reaction.next_state.short if reaction.next_state is not None else None,
    )
    if not await publish(xs, mine, keys, state=reaction.next_state):
        return None  # the device was removed under us
    return reaction


async def backend_start(xs: XenstoreClient, driver: HandshakeDriver) -> None:
    """A backend picking up a device (new, or left over from a previous backend process)."""
    mine, other = _dirs(driver)
    peer = await read_state(xs, other)
    me = await read_state(xs, mine)
    await _take(xs, driver, mine, me, peer, xenbus.backend_start(peer))


async def run_handshake(xs: XenstoreClient, driver: HandshakeDriver) -> None:
    """Drive the device's handshake forever (cancel the surrounding scope to stop).

    The watch delivers an initial event at once, so a driver starting late catches up.
    """
    _, other = _dirs(driver)
    if driver.role == "backend":
        await backend_start(xs, driver)
    async with xs.watch(f"{other}/state") as events:
        async for _event in events:
            # One event may hide several changes: keep going while reactions move our state.
            while (reaction := await step(xs, driver)) is not None:
                if reaction.next_state is None:
                    break
