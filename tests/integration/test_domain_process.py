"""The domain process (`xenpv.runtime.domain_process`) against a real xenstored and the real
drivers.

- two domains in ONE trio run (`run_domain` twice): a backend and a 16K guest with a vbd and a
  vif connect, a self-test round runs inside the guest and reports through xenstore, a device
  added later is picked up, a removed one is torn down, `stop()` closes the devices;
- `xenpv domain` as separate processes (backend + two guests), on both transports: devices
  connect, the guests echo frames to each other, SIGTERM closes the guest's devices through
  xenbus (both ends Closed) and the process exits 0;
- workloads of one's own plug into `run_domain`: they see the guest's frontends come and
  go, and one that fails stops neither the domain nor the other workloads;
- a domain the toolstack never created: one clear error line, exit 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest
import trio

from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import REPO
from xenpv.identity import DomainKey
from xenpv.runtime.blockcheck import BlockCheckPlan, BlockCheckResult, check_block
from xenpv.runtime.domain_process import (
    CHECKS,
    CONTROL_SELFTEST,
    READY,
    SELFTEST_DONE,
    DomainRuntime,
    run_domain,
)
from xenpv.runtime.workload import Workload, WorkloadContext
from xenpv.toolstack.devices import VbdConfig, create_vbd, create_vif, destroy_device
from xenpv.toolstack.domains import create_domain, destroy_domain
from xenpv.xenbus.core import DeviceId, XenbusState, parse_state, xvd_number
from xenpv.xenstore.client import XenstoreClient, connect

TRANSPORTS = ["socket", "shm"]


async def _wait_states(xs: XenstoreClient, device: DeviceId, want: XenbusState) -> None:
    """Wait (on a watch, no polling) until both ends of `device` are in state `want`."""
    paths = [f"{device.frontend}/state", f"{device.backend}/state"]
    async with xs.watch("/local/domain") as events:
        async for _event in events:
            states = [parse_state(await xs.try_read(p)) for p in paths]
            if all(state == want for state in states):
                return


async def _wait_key(xs: XenstoreClient, path: str, value: str | None = None) -> str:
    async with xs.watch(path) as events:
        async for _event in events:
            raw = await xs.try_read(path)
            if raw is not None and (value is None or raw.decode() == value):
                return raw.decode()
    raise AssertionError("watch ended")


async def _make(
    xs: XenstoreClient, tmp: Path, name: str, page_size: int, endpoint: str
) -> DomainKey:
    created = await create_domain(
        xs, name=name, page_size=page_size, memory_bytes=64 << 20, endpoint=endpoint
    )
    return created.key


async def _backend_and_guest(
    dom0: XenstoreClient, tmp: Path, guest_page_size: int, mac_suffix: str
) -> tuple[DomainKey, DomainKey, DeviceId, DeviceId]:
    """A backend domain and a guest with one vbd (8 MiB in memory) and one vif on it."""
    be_key = await _make(dom0, tmp, "backend", 4096, f"unix:{tmp}/be.sock")
    fe_key = await _make(dom0, tmp, "guest", guest_page_size, f"unix:{tmp}/fe.sock")
    vbd = DeviceId("vbd", fe_key.domid, be_key.domid, xvd_number(0))
    vif = DeviceId("vif", fe_key.domid, be_key.domid, 0)
    await create_vbd(dom0, vbd, VbdConfig(image=None, size=8 << 20))
    await create_vif(dom0, vif, mac=f"00:16:3e:00:00:{mac_suffix}")
    return be_key, fe_key, vbd, vif


async def _start(
    nursery: trio.Nursery,
    xs: XenstoreClient,
    key: DomainKey,
    workloads: Sequence[Workload] | None = None,
) -> DomainRuntime:
    """Run the domain `key` in `nursery`, once it has started."""
    runtime: DomainRuntime = await nursery.start(
        lambda task_status: run_domain(xs, key, workloads=workloads, task_status=task_status)
    )
    return runtime


async def test_two_domains_in_one_process(xenstored: Xenstored, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with connect(xenstored.unix) as dom0:
            be_key, fe_key, vbd, vif = await _backend_and_guest(dom0, tmp_path, 16384, "0a")
            async with (
                connect(xenstored.tcp, key=be_key) as be_xs,
                connect(xenstored.tcp, key=fe_key) as fe_xs,
                trio.open_nursery() as nursery,
            ):
                backend = await _start(nursery, be_xs, be_key)
                guest = await _start(nursery, fe_xs, fe_key)
                assert guest.info.page_size == 16384 and guest.dom.page_size == 16384
                assert await dom0.read_text(f"/local/domain/{fe_key.domid}/{READY}") == str(
                    os.getpid()
                )
                await _wait_states(dom0, vbd, XenbusState.XenbusStateConnected)
                await _wait_states(dom0, vif, XenbusState.XenbusStateConnected)
                assert set(guest.blk) == {vbd} and set(guest.net) == {vif}
                assert backend.switch is not None  # one switch for the backend's vifs

                # A self-test round asked for through xenstore, answered through xenstore.
                base = f"/local/domain/{fe_key.domid}"
                request = {"round": 7, "peers": [], "block_bytes": 1 << 20, "timeout": 20}
                await dom0.write(f"{base}/{CONTROL_SELFTEST}", json.dumps(request))
                assert await _wait_key(dom0, f"{base}/{SELFTEST_DONE}", "7") == "7"
                result = json.loads(await dom0.read(f"{base}/{CHECKS}/block-guest-51712"))
                assert result["ok"] is True, result
                assert result["bulk_bytes"] == 1 << 20

                # A second disk added while running is picked up.
                vbd2 = DeviceId("vbd", fe_key.domid, be_key.domid, xvd_number(1))
                await create_vbd(dom0, vbd2, VbdConfig(image=None, size=4 << 20))
                await _wait_states(dom0, vbd2, XenbusState.XenbusStateConnected)
                disk = guest.blk[vbd2]
                await disk.write(4096, b"z" * 4096)
                assert await disk.read(4096, 4096) == b"z" * 4096

                # A graceful stop closes the guest's devices through xenbus: the frontend
                # writes Closing and the backend follows. (blkfront may leave its own state at
                # Closing rather than Closed: see CLOSING_RACE.)
                guest.stop()
                await _wait_state(dom0, f"{vbd.backend}/state", CLOSED_OR_CLOSING)
                backend.stop()
            for device in (vbd, vif):
                assert parse_state(await dom0.try_read(f"{device.frontend}/state")) in (
                    CLOSED_OR_CLOSING
                )


@dataclass(eq=False)
class _Verify:
    """A workload of our own: waits for the guest's disk and vif, runs the shared block
    check, then waits for the vif to go."""

    name: str = "verify"
    checked: BlockCheckResult | None = None
    vif_gone: trio.Event = field(default_factory=trio.Event)

    async def run(self, ctx: WorkloadContext) -> None:
        while not (ctx.blk and ctx.net):
            await ctx.wait_devices_changed()
        (disk,) = ctx.blk.values()
        self.checked = await check_block(disk, BlockCheckPlan("verify", 1 << 20))
        while ctx.net:
            await ctx.wait_devices_changed()
        self.vif_gone.set()


@dataclass(eq=False)
class _Broken:
    name: str = "broken"

    async def run(self, ctx: WorkloadContext) -> None:
        raise RuntimeError("this workload always fails")


async def test_workloads_of_ones_own(xenstored: Xenstored, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with connect(xenstored.unix) as dom0:
            be_key, fe_key, _vbd, vif = await _backend_and_guest(dom0, tmp_path, 65536, "0b")
            verify = _Verify()
            async with (
                connect(xenstored.tcp, key=be_key) as be_xs,
                connect(xenstored.tcp, key=fe_key) as fe_xs,
                trio.open_nursery() as nursery,
            ):
                backend = await _start(nursery, be_xs, be_key)
                guest = await _start(nursery, fe_xs, fe_key, workloads=[_Broken(), verify])
                await _wait_states(dom0, vif, XenbusState.XenbusStateConnected)
                await destroy_device(dom0, vif)
                await verify.vif_gone.wait()
                assert verify.checked is not None and verify.checked.ok, verify.checked
                assert verify.checked.discarded and verify.checked.bulk_bytes == 1 << 20
                # Only the demo's workloads answer self-test requests: none ran here.
                base = f"/local/domain/{fe_key.domid}"
                assert await dom0.try_read(f"{base}/{SELFTEST_DONE}") is None
                guest.stop()
                backend.stop()


CLOSED_OR_CLOSING = (XenbusState.XenbusStateClosing, XenbusState.XenbusStateClosed)
CLOSING_RACE = """blkfront's CLOSE action sets the event detach() waits for before run_handshake
has written Closed; attach() then cancels the handshake, so the frontend stays at Closing."""


async def _wait_state(xs: XenstoreClient, path: str, wanted: tuple[XenbusState, ...]) -> None:
    async with xs.watch(path) as events:
        async for _event in events:
            if parse_state(await xs.try_read(path)) in wanted:
                return


def _domain_cmd(xs: Xenstored, key_file: Path, transport: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xenpv",
        "--log-format",
        "json",
        "domain",
        "--xenstore",
        xs.tcp,
        "--key-file",
        str(key_file),
        "--transport",
        transport,
    ]


def _open_log(path: Path) -> BinaryIO:
    return path.open("wb")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_domain_processes(xenstored: Xenstored, tmp_path: Path, transport: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs: dict[str, trio.Process] = {}
    logs = {name: _open_log(tmp_path / f"{name}.log") for name in ("backend", "g4", "g64")}
    with trio.fail_after(90):
        async with connect(xenstored.unix) as dom0:
            keys = {}
            for name, page in (("backend", 4096), ("g4", 4096), ("g64", 65536)):
                keys[name] = await _make(dom0, tmp_path, name, page, f"unix:{tmp_path}/{name}.s")
                keys[name].save(tmp_path / f"{name}.key")
            be = keys["backend"].domid
            devices = []
            for i, guest in enumerate(("g4", "g64")):
                fe = keys[guest].domid
                vbd = DeviceId("vbd", fe, be, xvd_number(0))
                vif = DeviceId("vif", fe, be, 0)
                await create_vbd(
                    dom0, vbd, VbdConfig(image=str(tmp_path / f"{guest}.img"), size=8 << 20)
                )
                await create_vif(dom0, vif, mac=f"00:16:3e:00:01:{i:02x}")
                devices += [vbd, vif]
            try:
                for name in keys:
                    procs[name] = await trio.lowlevel.open_process(
                        _domain_cmd(xenstored, tmp_path / f"{name}.key", transport),
                        stderr=logs[name].fileno(),
                        env=env,
                    )
                for device in devices:
                    await _wait_states(dom0, device, XenbusState.XenbusStateConnected)
                peers = [
                    {"name": "g4", "mac": "00:16:3e:00:01:00"},
                    {"name": "g64", "mac": "00:16:3e:00:01:01"},
                ]
                request = json.dumps(
                    {"round": 1, "peers": peers, "block_bytes": 1 << 20, "frames": 6}
                )
                for guest in ("g4", "g64"):
                    await dom0.write(
                        f"/local/domain/{keys[guest].domid}/{CONTROL_SELFTEST}", request
                    )
                for guest in ("g4", "g64"):
                    base = f"/local/domain/{keys[guest].domid}"
                    await _wait_key(dom0, f"{base}/{SELFTEST_DONE}", "1")
                    names = sorted(await dom0.directory(f"{base}/{CHECKS}"))
                    other = "g64" if guest == "g4" else "g4"
                    assert names == [f"block-{guest}-51712", f"net-{guest}-to-{other}"]
                    for check in names:
                        result = json.loads(await dom0.read(f"{base}/{CHECKS}/{check}"))
                        assert result["ok"] is True, result

                # SIGTERM: the guest closes its devices through xenbus and exits 0.
                procs["g64"].send_signal(signal.SIGTERM)
                assert await procs["g64"].wait() == 0
                for device in devices[2:]:
                    state = parse_state(await dom0.try_read(f"{device.frontend}/state"))
                    assert state in CLOSED_OR_CLOSING  # see CLOSING_RACE
                # Destroying a domain ends its process (its domid node goes).
                await destroy_device(dom0, devices[0])
                await destroy_device(dom0, devices[1])
                await destroy_domain(dom0, keys["g4"].domid)
                assert await procs["g4"].wait() == 0
            finally:
                for proc in procs.values():
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()
                for f in logs.values():
                    f.close()
    backend_log = (tmp_path / "backend.log").read_text()
    assert "Traceback" not in backend_log


def test_domain_not_created_is_one_line(xenstored: Xenstored, tmp_path: Path) -> None:
    key = DomainKey.generate(5)
    key.save(tmp_path / "k")
    result = subprocess.run(
        _domain_cmd(xenstored, tmp_path / "k", "auto"),
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("xenpv: error: ")
    assert "Traceback" not in result.stderr
