"""One broken device never takes a domain down (`xenpv.runtime.domain_process`, module doc).

A backend serving three vbds and a vif for one guest, in one trio run with real drivers and
a real xenstored: the backend driver of one vbd raises (as a xenstore quota refusal would),
the guest's frontend of another raises; each goes Closing with its reason in
`error/<device path>/error` (Linux's `xenbus_dev_fatal`), and the other devices keep doing
I/O, on both ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

import backends.blkback
import frontends.blkfront
from tests.integration.conftest import Xenstored
from tests.integration.test_domain_process import _make, _wait_key, _wait_states
from xenpv.runtime.domain_process import DomainRuntime, fatal_error_path, run_domain
from xenpv.toolstack.devices import VbdConfig, create_vbd, create_vif
from xenpv.xenbus.core import Closing, DeviceId, XenbusState, parse_state, xvd_number
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import XsError


async def test_one_failed_device_leaves_the_others_working(
    xenstored: Xenstored, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.fail_after(60):
        async with connect(xenstored.unix) as dom0:
            be_key = await _make(dom0, tmp_path, "backend", 4096, f"unix:{tmp_path}/be.sock")
            fe_key = await _make(dom0, tmp_path, "guest", 4096, f"unix:{tmp_path}/fe.sock")
            vbds = [DeviceId("vbd", fe_key.domid, be_key.domid, xvd_number(i)) for i in range(3)]
            vif = DeviceId("vif", fe_key.domid, be_key.domid, 0)
            for vbd in vbds:
                await create_vbd(dom0, vbd, VbdConfig(image=None, size=4 << 20))
            await create_vif(dom0, vif, mac="00:16:3e:00:00:0b")
            broken_backend, broken_frontend, healthy = vbds

            serve, attach = backends.blkback.serve, frontends.blkfront.attach

            async def failing_serve(dom: Any, xs: Any, device: DeviceId) -> None:
                if device == broken_backend:
                    raise XsError("E2BIG", "watch quota")
                await serve(dom, xs, device)

            def failing_attach(dom: Any, xs: Any, device: DeviceId) -> Any:
                if device == broken_frontend:
                    raise RuntimeError("frontend exploded")
                return attach(dom, xs, device)

            monkeypatch.setattr(backends.blkback, "serve", failing_serve)
            monkeypatch.setattr(frontends.blkfront, "attach", failing_attach)
            async with (
                connect(xenstored.tcp, key=be_key) as be_xs,
                connect(xenstored.tcp, key=fe_key) as fe_xs,
                trio.open_nursery() as nursery,
            ):
                backend: DomainRuntime = await nursery.start(
                    lambda task_status: run_domain(be_xs, be_key, task_status=task_status)
                )
                guest: DomainRuntime = await nursery.start(
                    lambda task_status: run_domain(fe_xs, fe_key, task_status=task_status)
                )
                # Each failure is recorded where Linux's xenbus_dev_fatal puts it, and the
                # failing end switched to Closing.
                be_error = fatal_error_path(backend.base, broken_backend.backend)
                assert "E2BIG" in await _wait_key(dom0, be_error)
                fe_error = fatal_error_path(guest.base, broken_frontend.frontend)
                assert "frontend exploded" in await _wait_key(dom0, fe_error)
                raw = await dom0.try_read(f"{broken_backend.backend}/state")
                assert parse_state(raw) == Closing

                # The others connect and do I/O on both ends.
                await _wait_states(dom0, healthy, XenbusState.XenbusStateConnected)
                await _wait_states(dom0, vif, XenbusState.XenbusStateConnected)
                disk = guest.blk[healthy]
                await disk.write(8192, b"k" * 4096)
                assert await disk.read(8192, 4096) == b"k" * 4096
                assert set(guest.net) == {vif}
                assert backend.switch is not None
                guest.stop()
                backend.stop()
