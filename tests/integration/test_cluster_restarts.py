"""Restarts in a running cluster: xenstored killed with SIGKILL and restarted (acknowledged
writes survive in its persisted store, clients reconnect and re-register their watches,
devices stay Connected, the cluster's death watcher follows the new process instead of
failing), and a domain process killed and restarted by its policy (the cluster tells
`on_domain` it went down and came back up, which a fault run records in its history)."""

from __future__ import annotations

import os
import signal
import tomllib

import trio

from tests.integration.conftest import short_tempdir
from tests.integration.xenpv_cli import SMALL_VBD_FEATURES, small_topology
from xenpv.toolstack import cluster
from xenpv.toolstack.supervisor import Supervisor
from xenpv.toolstack.topology import parse
from xenpv.xenbus.core import Connected, parse_state


def _xenstored_pid(c: cluster.Cluster) -> int:
    return next(child.pid for child in c.children if child.kind == "xenstored" and child.running)


async def test_kill_9_and_restart_keeps_writes_watches_and_devices() -> None:
    topology = parse(tomllib.loads(small_topology(vbd_features=SMALL_VBD_FEATURES)))
    sup = Supervisor()
    with short_tempdir() as state_dir, trio.fail_after(120):
        try:
            async with cluster.launch(topology, state_dir, sup=sup, log_level="warning") as c:
                xs = c.xs
                for n in range(20):
                    await xs.write(f"/tool/test/k{n}", str(n))  # acknowledged: journalled
                async with xs.watch("/tool/test") as events:
                    await events.__anext__()  # the initial event
                    before = _xenstored_pid(c)
                    await cluster.kill_xenstored(c)
                    await cluster.restart_xenstored(c)
                    assert _xenstored_pid(c) != before
                    for n in range(20):
                        assert await xs.read(f"/tool/test/k{n}") == str(n).encode()
                    # The client re-registered the watch: its initial event, then ours.
                    await xs.write("/tool/test/after", "1")
                    while (await events.__anext__())[0] != "/tool/test/after":
                        pass
                for device in c.devices:
                    for end in (device.frontend, device.backend):
                        assert parse_state(await xs.try_read(f"{end}/state")) == Connected
                assert c.xenstored_restart is None  # its death watcher follows the new one
                assert all(child.running for child in c.children)
        finally:
            await sup.stop()
    assert all(not child.running for child in sup.children)


async def test_a_killed_domain_is_reported_down_then_up() -> None:
    text = small_topology(restart="on-failure", vbd_features=SMALL_VBD_FEATURES)
    topology = parse(tomllib.loads(text))
    sup = Supervisor()
    events: list[tuple[str, str]] = []
    back_up = trio.Event()

    def on_domain(name: str, event: str) -> None:
        events.append((name, event))
        if event == "up":
            back_up.set()

    with short_tempdir() as state_dir, trio.fail_after(120):
        try:
            async with cluster.launch(topology, state_dir, sup=sup, log_level="warning") as c:
                c.on_domain = on_domain
                guest = next(child for child in c.children if child.name == "g16")
                os.kill(guest.pid, signal.SIGKILL)
                await back_up.wait()
                assert events == [("g16", "down"), ("g16", "up")]
                assert c.restarts == {"g16": 1}
        finally:
            await sup.stop()
    assert all(not child.running for child in sup.children)
