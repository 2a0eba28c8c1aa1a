"""kill -9 during a stream of acknowledged writes: after a restart every acknowledged write is
there, and our client reconnects by itself with its watches re-registered."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.integration.conftest import Xenstored
from xenpv.xenstore.client import Transaction, connect


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
