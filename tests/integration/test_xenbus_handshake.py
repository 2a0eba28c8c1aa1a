"""The handshake loop (xenpv.xenbus.handshake) with stand-in drivers against a real xenstored."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.toolstack.devices import VbdConfig, create_vbd, create_vif, destroy_device, list_devices
from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import Action, Connected, DeviceClass, DeviceId, XenbusState
from xenpv.xenbus.handshake import KeyValues, publish, read_keys, read_state, run_handshake
from xenpv.xenstore.client import XenstoreClient, connect


@dataclass
class StandIn:
    """Records actions; publishes a ring-ref on SETUP like a frontend would."""

    device: DeviceId
    role: xenbus.Role
    actions: list[Action] = field(default_factory=list)
    generation: int = 0

    async def perform(self, action: Action) -> KeyValues | None:
        self.actions.append(action)
        if action is Action.SETUP:
            self.generation += 1
            return {"ring-ref": self.generation, "event-channel": 5}
        if action is Action.ADVERTISE:
            return {"feature-persistent": 1}
        return {}


async def wait_states(
    xs: XenstoreClient, device: DeviceId, fe: XenbusState, be: XenbusState, ring_ref: str = "1"
) -> None:
    # One watch on the common ancestor fires for either end; re-read both states each time.
    async with xs.watch("/local/domain") as events:
        async for _ in events:
            got = (await read_state(xs, device.frontend), await read_state(xs, device.backend))
            ref = (await read_keys(xs, device.frontend, ["ring-ref"]))["ring-ref"]
            if got == (fe, be) and ref == ring_ref:
                return


@pytest.mark.parametrize("cls", ["vbd", "vif"])
async def test_handshake_and_backend_restart(xenstored: Xenstored, cls: DeviceClass) -> None:
    device = DeviceId(cls, frontend_domid=1, backend_domid=0, devid=51712 if cls == "vbd" else 0)
    with trio.fail_after(20):
        async with connect(xenstored.unix) as xs:
            if cls == "vbd":
                await create_vbd(xs, device, VbdConfig(image=None, size=1 << 20))
            else:
                await create_vif(xs, device, mac="00:16:3e:00:00:01")
            assert await list_devices(xs, 0) == [device]
            front = StandIn(device, "frontend")
            back = StandIn(device, "backend")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_handshake, xs, front)
                back_scope = trio.CancelScope()

                async def backend() -> None:
                    with back_scope:
                        await run_handshake(xs, back)

                nursery.start_soon(backend)
                await wait_states(xs, device, Connected, Connected)
                keys = await read_keys(xs, device.frontend, ["ring-ref", "event-channel"])
                assert keys == {"ring-ref": "1", "event-channel": "5"}
                assert Action.CONNECT in back.actions

                # The backend process dies and a new one picks the device up: the frontend
                # tears down, starts over, and publishes fresh rings.
                back_scope.cancel()
                back = StandIn(device, "backend")
                nursery.start_soon(run_handshake, xs, back)
                await wait_states(xs, device, Connected, Connected, ring_ref="2")
                assert front.generation == 2
                assert (await read_keys(xs, device.frontend, ["ring-ref"]))["ring-ref"] == "2"
                nursery.cancel_scope.cancel()
            await destroy_device(xs, device)
            assert await list_devices(xs, 0) == []


async def test_publish_never_resurrects_a_removed_device(xenstored: Xenstored) -> None:
    device = DeviceId("vif", frontend_domid=1, backend_domid=0, devid=0)
    with trio.fail_after(10):
        async with connect(xenstored.unix) as xs:
            await create_vif(xs, device, mac="00:16:3e:00:00:01")
            assert await publish(xs, device.backend, {"feature-sg": 1}, state=Connected)
            await destroy_device(xs, device)
            assert not await publish(xs, device.backend, {"feature-sg": 1}, state=Connected)
            assert await xs.try_read(device.backend) is None
