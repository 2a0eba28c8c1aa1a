"""The runner's per-cell devices: the backend's configuration arrives with the device."""

from __future__ import annotations

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.interop.matrix import VBD_PROFILES, VIF_PROFILES, Cell
from xenpv.interop.runner import (
    MAX_GRANULE_CONFIG_KEY,
    VIF_MAX_QUEUES_KEY,
    Options,
    _create_cell_devices,
)
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
                            raw = await xs.try_read(f"{directory}/{MAX_GRANULE_CONFIG_KEY}")
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
                assert await xs.read(f"{device.backend}/{MAX_GRANULE_CONFIG_KEY}") == want
            assert await xs.read(f"{made[0].backend}/xenpv-max-queues") == b"4"
            assert await xs.read(f"{made[0].backend}/xenpv-max-indirect-segments") == b"256"
            assert await xs.read(f"{made[1].backend}/{VIF_MAX_QUEUES_KEY}") == b"2"
            macs = {await xs.read(f"{d.frontend}/mac") for d in made[1:]}
            assert len(macs) == 2
            await all_seen.wait()
            assert all(raw == want for _d, raw in seen), seen
            nursery.cancel_scope.cancel()
