"""`xenpv faults run hotplug` end to end: a vbd and a vif detached under load through the
xenbus close handshake and re-attached under the same id; the run passes every checker, the
history has both faults' start and stop, the whole handshake in the `state` lines, and every
detached device Connected again on both ends at the end."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from tests.integration.faults_cli import run_faults, run_verdict
from xenpv.faults import plan, schedule
from xenpv.faults.device import KIND as DEVICE_KIND
from xenpv.faults.device import DeviceInjector
from xenpv.faults.schedule import ScheduledFault
from xenpv.toolstack import devices, hotplug
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus import keys
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreClient, connect

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 90.0  # the plan lasts 20 s plus a 6 s quiet tail; start-up and teardown more
DETACHED = ("state:guest4k:vbd:xvda", "state:guest16k:vif:0")


async def _keys(xs: XenstoreClient, directory: str) -> dict[str, bytes]:
    out = {}
    for name in await xs.try_directory(directory):
        raw = await xs.try_read(f"{directory}/{name}")
        if raw is not None:
            out[name] = raw
    return out


async def test_reattach_writes_back_the_saved_configuration(xenstored: Xenstored) -> None:
    """`save_config` then `reattach` re-creates both directories with the same configuration
    keys (a vbd with non-default features, a vif with a TAP) and a new attach instance."""
    vbd = DeviceId("vbd", 7, 3, 51728)
    vif = DeviceId("vif", 7, 3, 1)
    config = VbdConfig(
        image="/nonexistent/d.img",
        size=1 << 20,
        read_only=True,
        sector_size=4096,
        features=VbdFeatures(queues=2, persistent=False),
        nbd="unix:/tmp/x.sock",
    )
    with trio.fail_after(20):
        async with connect(xenstored.unix) as xs:
            await devices.create_vbd(xs, vbd, config)
            await devices.create_vif(xs, vif, mac="00:16:3e:00:00:07", tap="tap7")
            for device in (vbd, vif):
                before = (await _keys(xs, device.backend), await _keys(xs, device.frontend))
                saved = await hotplug.save_config(xs, device)
                with pytest.raises(hotplug.HotplugError, match="already exists"):
                    await hotplug.reattach(xs, saved)
                await devices.destroy_device(xs, device)
                assert not await hotplug.device_exists(xs, device)
                with pytest.raises(hotplug.HotplugError, match="no device"):
                    await hotplug.save_config(xs, device)
                await hotplug.reattach(xs, saved)
                after = (await _keys(xs, device.backend), await _keys(xs, device.frontend))
                for old, new in zip(before, after, strict=True):
                    assert old[keys.XENPV_INSTANCE] != new[keys.XENPV_INSTANCE]
                    old.pop(keys.XENPV_INSTANCE)
                    new.pop(keys.XENPV_INSTANCE)
                    assert old == new
            assert saved.frontend_keys[keys.XENPV_TAP] == "tap7"


def test_hotplug_plan_detaches_and_reattaches_under_load(tmp_path: Path) -> None:
    # Short: the state directory holds Unix sockets (pytest's tmp paths can be too long).
    state = Path(tempfile.mkdtemp(prefix="xf-hotplug-", dir="/tmp"))
    history = tmp_path / "hotplug.jsonl"
    try:
        result = run_faults("hotplug", state, history, RUN_TIMEOUT)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    summary = run_verdict(result)
    assert summary["ok"] is True
    assert summary["violations"] == []
    assert summary["faults_injected"] == 2

    ops = [json.loads(line) for line in history.read_text().splitlines()]
    windows = [
        (op["f"], op["value"]["target"]) for op in ops if op["f"] in ("fault-start", "fault-stop")
    ]
    assert windows == [
        ("fault-start", "device:guest4k:vbd:xvda"),
        ("fault-stop", "device:guest4k:vbd:xvda"),
        ("fault-start", "device:guest16k:vif:0"),
        ("fault-stop", "device:guest16k:vif:0"),
    ]
    for prefix in DETACHED:
        for end in ("frontend", "backend"):
            values = [
                op["value"] for op in ops if op["f"] == "state" and op["key"] == f"{prefix}:{end}"
            ]
            # Connected, gone (the directories removed: 0), then Connected again at the end.
            assert values[0] == 4, (prefix, end, values)
            assert 0 in values, (prefix, end, values)
            assert values[-1] == 4, (prefix, end, values)
        backend = [
            op["value"] for op in ops if op["f"] == "state" and op["key"] == f"{prefix}:backend"
        ]
        # The close handshake, not a bare removal: backend Closing, then Closed, then removed.
        gone = backend.index(0)
        assert backend[gone - 2 : gone] == [5, 6], backend


def _fault(target: str, **params: bool | float) -> ScheduledFault:
    return ScheduledFault(
        "f0.0", 0, DEVICE_KIND, target, 0.0, 1.0, None, None, tuple(sorted(params.items()))
    )


async def test_injector_forces_after_grace_or_leaves_the_device_closing(
    xenstored: Xenstored,
) -> None:
    """With nobody serving the device the close handshake never finishes: without `force` the
    device is left offline and Closing and nothing is re-attached; with `force` it is removed
    after `grace` and re-attached at the stop."""
    targets = schedule.build(plan.builtin("hotplug")).topology
    domids = {"backend": 3, "guest4k": 7, "guest16k": 8, "guest64k": 9}
    target = "device:guest4k:vbd:xvda"
    with trio.fail_after(20):
        async with connect(xenstored.unix) as xs:
            injector = DeviceInjector(xs, targets, domids)
            device = injector.device(_fault(target))
            await devices.create_vbd(xs, device, VbdConfig(image=None, size=1 << 20))
            gentle = _fault(target, grace=0.1, force=False)
            assert injector.handles(gentle)
            await injector.detach(gentle)
            assert await xs.try_read(f"{device.backend}/state") == b"5"  # Closing
            assert await xs.try_read(f"{device.backend}/{keys.ONLINE}") == b"0"
            await injector.reattach(gentle, wait=0.1)  # nothing saved: nothing to do
            assert await xs.try_read(f"{device.backend}/state") == b"5"

            forced = _fault(target, grace=0.1)  # force: the catalogue's default, true
            await injector.detach(forced)
            assert not await hotplug.device_exists(xs, device)
            await injector.detach(forced)  # already gone: logged, not raised
            await injector.reattach(forced, wait=0.1)  # nobody connects it: bounded wait
            assert await xs.try_read(f"{device.backend}/state") == b"1"  # Initialising
            assert await xs.try_read(f"{device.backend}/{keys.ONLINE}") == b"1"
