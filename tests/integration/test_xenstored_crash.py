"""kill -9 during a stream of acknowledged writes: after a restart every acknowledged write is
there, and our client reconnects by itself with its watches re-registered."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.xenstore.client import Transaction, XenstoreConnectionError, connect


async def _wait_for(events: object, wanted: tuple[str, str]) -> None:
    async for event in events:  # type: ignore[attr-defined]
        if event == wanted:
            return


async def test_sigkill_loses_no_acknowledged_write(xs_workdir: Path) -> None:
    # A small compaction threshold so that kills also land around snapshot writes.
    server = Xenstored(xs_workdir, tcp=False, extra=("--compact-bytes", "16384"))
    server.start()
    acked: dict[str, str] = {}
    try:
        with trio.fail_after(120):
            async with (
                connect(server.unix, reconnect_timeout=60) as xs,
                xs.watch("/crash/watched", "w") as events,
            ):
                assert await events.__anext__() == ("/crash/watched", "w")
                progress = trio.Event()

                async def writer(n: int) -> None:
                    nonlocal progress
                    i = 0
                    while True:
                        path, value = f"/crash/{n}/{i}", f"v{n}-{i}"
                        await xs.write(path, value)
                        acked[path] = value
                        i += 1
                        if len(acked) % 100 == 0:
                            progress.set()

                async def tx_writer() -> None:
                    i = 0
                    while True:

                        async def body(tx: Transaction, i: int = i) -> None:
                            await tx.write(f"/crash/tx/{i}/a", "A")
                            await tx.write(f"/crash/tx/{i}/b", "B")

                        await xs.transact(body)
                        acked[f"/crash/tx/{i}/a"] = "A"
                        acked[f"/crash/tx/{i}/b"] = "B"
                        i += 1

                async with trio.open_nursery() as nursery:
                    for n in range(8):
                        nursery.start_soon(writer, n)
                    nursery.start_soon(tx_writer)
                    for _round in range(5):
                        for _ in range(3):  # let a few hundred writes through
                            progress = trio.Event()
                            await progress.wait()
                        server.kill()
                        await trio.to_thread.run_sync(server.start)
                    progress = trio.Event()
                    await progress.wait()  # the client is back and writing
                    nursery.cancel_scope.cancel()

                # The client re-registered its watch: the fresh initial event, then events.
                await _wait_for(events, ("/crash/watched", "w"))
                async with connect(server.unix) as other:
                    await other.write("/crash/watched/sub", "fired")
                await _wait_for(events, ("/crash/watched/sub", "w"))

            server.kill()
            await trio.to_thread.run_sync(server.start)
            async with connect(server.unix) as check:
                missing = [p for p, v in acked.items() if await check.try_read(p) != v.encode()]
        assert len(acked) > 1200
        assert missing == []
        assert "journal compacted" in server.log()
    finally:
        server.stop()


async def test_transaction_open_across_a_restart_is_retried(xs_workdir: Path) -> None:
    server = Xenstored(xs_workdir, tcp=False)
    server.start()
    try:
        with trio.fail_after(60):
            async with connect(server.unix) as xs:
                await xs.write("/tx/n", "1")
                attempts = 0
                inside = trio.Event()
                restarted = trio.Event()

                async def body(tx: Transaction) -> str:
                    nonlocal attempts
                    attempts += 1
                    value = await tx.read_text("/tx/n")
                    if attempts == 1:
                        inside.set()
                        await restarted.wait()  # the server dies with this transaction open
                    await tx.write("/tx/n", str(int(value) + 1))
                    return value

                async def restart() -> None:
                    await inside.wait()
                    server.kill()
                    await trio.to_thread.run_sync(server.start)
                    restarted.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(restart)
                    assert await xs.transact(body) == "1"
                assert attempts == 2
                assert await xs.read_text("/tx/n") == "2"
    finally:
        server.stop()


async def test_client_gives_up_after_the_reconnect_timeout(xs_workdir: Path) -> None:
    server = Xenstored(xs_workdir, tcp=False)
    server.start()
    with trio.fail_after(30):
        async with connect(server.unix, reconnect_timeout=0.5) as xs:
            async with xs.watch("/gone", "t") as events:
                assert await events.__anext__() == ("/gone", "t")
                server.kill()  # and never restarted
                with pytest.raises(XenstoreConnectionError, match="gave up"):
                    await events.__anext__()
            with pytest.raises(XenstoreConnectionError):
                await xs.read("/gone")
