"""The runner's per-cell devices: the backend's configuration arrives with the device."""

from __future__ import annotations

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.interop.matrix import VBD_PROFILES, VIF_PROFILES, Cell
from xenpv.interop.runner import (
    Options,
    _create_cell_devices,
)
from xenpv.interop.worker import CellError, backend_error_path, connected
from xenpv.xenbus.keys import XENPV_MAX_GRANULE_ORDER, XENPV_MAX_QUEUES
from xenpv.xenstore.client import connect

pytestmark = pytest.mark.trio


@pytest.mark.parametrize("extension", [False, True])
async def test_config_keys_are_written_with_the_device(
    xenstored: Xenstored, extension: bool
) -> None:
    vbd = Cell(65536, 4096, extension, "vbd", VBD_PROFILES[1])
    vif = Cell(16384, 4096, extension, "vif", VIF_PROFILES[1])
    with trio.fail_after(20):
        async with connect(xenstored.unix) as xs, trio.open_nursery() as nursery:
            # A watcher standing in for the backend: whenever it sees a device's state, the
            # granule configuration must already be there (one transaction).
            seen: list[tuple[str, bytes | None]] = []
            started, all_seen = trio.Event(), trio.Event()

            async def backend_view() -> None:
                async with xs.watch("/local/domain/0/backend") as events:
                    started.set()
                    async for path, _token in events:
                        if path.endswith("/state"):
                            directory = path.rsplit("/", 1)[0]
                            raw = await xs.try_read(f"{directory}/{XENPV_MAX_GRANULE_ORDER}")
                            if await xs.try_read(path) is not None:
                                seen.append((directory, raw))
                            if len({d for d, _raw in seen}) == 3:
                                all_seen.set()

            nursery.start_soon(backend_view)
            await started.wait()
            made = await _create_cell_devices(xs, vbd, 5, 0, 0, Options(quick=True))
            made += await _create_cell_devices(xs, vif, 6, 0, 0, Options(quick=True))
            assert [d.cls for d in made] == ["vbd", "vif", "vif"]
            assert made[1].devid == 0 and made[2].devid == 1  # the echo pair
            want = b"4" if extension else b"0"
            for device in made:
                assert await xs.read(f"{device.backend}/{XENPV_MAX_GRANULE_ORDER}") == want
            assert await xs.read(f"{made[0].backend}/xenpv-max-queues") == b"4"
            assert await xs.read(f"{made[0].backend}/xenpv-max-indirect-segments") == b"256"
            assert await xs.read(f"{made[1].backend}/{XENPV_MAX_QUEUES}") == b"2"
            macs = {await xs.read(f"{d.frontend}/mac") for d in made[1:]}
            assert len(macs) == 2
            await all_seen.wait()
            assert all(raw == want for _d, raw in seen), seen
            nursery.cancel_scope.cancel()


class _NeverConnects:
    async def wait_connected(self) -> None:
        await trio.sleep_forever()


async def test_a_backend_giving_up_fails_the_cell_at_once(xenstored: Xenstored) -> None:
    """xenbus_dev_fatal (error node + Closing) ends the wait with the backend's reason."""
    cell = Cell(65536, 4096, True, "vbd", VBD_PROFILES[0])
    with trio.fail_after(10):
        async with connect(xenstored.unix) as xs:
            (device,) = await _create_cell_devices(xs, cell, 7, 0, 0, Options(quick=True))
            reason = "grant-granule-order 4 exceeds max-grant-granule-order 0"

            async def refuse() -> None:
                await xs.write(backend_error_path(device), reason)
                await xs.write(f"{device.backend}/state", "5")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse)
                with pytest.raises(CellError, match="exceeds max-grant-granule-order 0"):
                    await connected(xs, [(_NeverConnects(), device)], limit_s=60)
