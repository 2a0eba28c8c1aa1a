"""Everything durable survives kill -9 exactly: values, perms, child order, domains; through
the journal and through a snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.xenstore.client import Transaction, XenstoreClient, connect


async def _dump(xs: XenstoreClient) -> dict[str, tuple[bytes, list[str], list[str]]]:
    out: dict[str, tuple[bytes, list[str], list[str]]] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        children = await xs.directory(path)
        out[path] = (await xs.read(path), await xs.get_perms(path), children)
        todo += [("" if path == "/" else path) + "/" + c for c in children]
    return out


async def _populate(xs: XenstoreClient) -> None:
    for name in ("zeta", "alpha", "mid"):  # insertion order, not sorted
        await xs.write(f"/order/{name}", name)
    await xs.write("/bin", b"\x00\x01\xff")
    await xs.write("/empty", b"")
    await xs.mkdir("/local/domain/4/device")
    await xs.set_perms("/local/domain/4", ["n4", "r0", "b7"])
    await xs.set_perms("/order/mid", ["w3", "r4"])
    await xs.rm("/order/alpha")
    await xs.write("/order/alpha", "again")  # re-created: now last

    async def tx(t: Transaction) -> None:
        await t.write("/tx/a", "1")
        await t.write("/tx/b", "2")
        await t.rm("/tx/a")

    await xs.transact(tx)
    await xs.introduce(4, 99, 7)
    await xs.introduce(5, 98, 8)
    await xs.release(5)
    big = [f"entry-number-{i:04d}-with-padding" for i in range(200)]
    for name in big:
        await xs.write(f"/big/{name}", "")


@pytest.mark.parametrize("compact", [False, True], ids=["journal", "snapshot"])
async def test_state_survives_kill_exactly(xs_workdir: Path, compact: bool) -> None:
    extra = ("--compact-bytes", "1") if compact else ()
    server = Xenstored(xs_workdir, tcp=False, extra=extra)
    server.start()
    try:
        with trio.fail_after(60):
            async with connect(server.unix) as xs:
                await _populate(xs)
                before = await _dump(xs)
                domains = [await xs.is_domain_introduced(d) for d in (4, 5)]
            server.kill()
            await trio.to_thread.run_sync(server.start)
            async with connect(server.unix) as xs:
                assert await _dump(xs) == before
                assert (
                    [await xs.is_domain_introduced(d) for d in (4, 5)]
                    == domains
                    == [
                        True,
                        False,
                    ]
                )
        assert ("journal compacted" in server.log()) == compact
        assert before["/order"][2] == ["zeta", "mid", "alpha"]
        assert before["/local/domain/4"][1] == ["n4", "r0", "b7"]
    finally:
        server.stop()
