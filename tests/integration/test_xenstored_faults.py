"""The xenstore fault seam: every request passes `ServerConfig.faults` (in-process server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from xenpv.xenstore.client import connect
from xenpv.xenstore.server import ServerConfig, XenstoreServer, XsVerdict, open_store
from xenpv.xenstore.wire import Message, XsError, XsType


class Plan:
    """Delay writes under /slow, EIO for reads of /broken, break the link once on /die."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.died = False

    def on_request(self, domid: int, msg: Message) -> XsVerdict | None:
        self.seen.append((domid, msg.type))
        if msg.type == XsType.XS_WRITE and msg.payload.startswith(b"/slow"):
            return XsVerdict(delay=0.05)
        if msg.type == XsType.XS_READ and msg.payload.startswith(b"/broken"):
            return XsVerdict(error="EIO")
        if msg.payload.startswith(b"/die") and not self.died:
            self.died = True
            return XsVerdict(fail="injected")
        return None


async def test_fault_plan_sees_and_shapes_every_request(xs_workdir: Path) -> None:
    plan = Plan()
    store, journal = open_store(xs_workdir / "data")
    socket_path = str(xs_workdir / "socket")
    server = XenstoreServer(store, journal, ServerConfig(socket_path, xs_workdir, faults=plan))
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                async with connect(f"unix:{socket_path}") as xs:
                    await xs.write("/slow/a", "1")
                    assert await xs.read_text("/slow/a") == "1"  # order kept after a delay
                    await xs.write("/broken", "x")
                    with pytest.raises(XsError) as info:
                        await xs.read("/broken")
                    assert info.value.errno_name == "EIO"
                    # The connection breaks; the client reconnects and re-sends the write.
                    await xs.write("/die", "survived")
                    assert await xs.read_text("/die") == "survived"
                assert plan.died
                assert (0, XsType.XS_WRITE) in plan.seen
                nursery.cancel_scope.cancel()
    finally:
        journal.close()


class BrokenPlan:
    def on_request(self, domid: int, msg: Message) -> XsVerdict | None:
        if msg.payload.startswith(b"/bug"):
            return XsVerdict(error="NOT-AN-ERRNO")  # makes the handler raise
        return None


async def test_a_failing_handler_closes_only_its_connection(xs_workdir: Path) -> None:
    store, journal = open_store(xs_workdir / "data")
    socket_path = str(xs_workdir / "socket")
    config = ServerConfig(socket_path, xs_workdir, faults=BrokenPlan())
    server = XenstoreServer(store, journal, config)
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                victim = await trio.open_unix_socket(socket_path)
                await victim.send_all(Message(XsType.XS_READ, 1, 0, b"/bug\0").encode())
                assert await victim.receive_some(100) == b""  # closed, no traceback escaped
                async with connect(f"unix:{socket_path}") as xs:
                    await xs.write("/fine", "yes")
                    assert await xs.read_text("/fine") == "yes"
                nursery.cancel_scope.cancel()
    finally:
        journal.close()
