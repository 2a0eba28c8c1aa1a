"""Client library against a real xenstored subprocess over its Unix socket."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.xenstore.client import (
    Transaction,
    XenstoreClient,
    XenstoreConnectionError,
    connect,
)
from xenpv.xenstore.wire import XsError

TIMEOUT = 20


async def test_basic_operations(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs:
            assert xs.domid == 0
            await xs.write("/a/b/c", "hello")
            assert await xs.read("/a/b/c") == b"hello"
            assert await xs.read_text("/a/b/c") == "hello"
            assert await xs.read("/a/b") == b""  # implicit ancestor, empty
            assert await xs.try_read("/a/missing") is None
            with pytest.raises(XsError) as info:
                await xs.read("/a/missing")
            assert info.value.errno_name == "ENOENT"
            await xs.write("/a/bin", b"\x00\xff\x00")
            assert await xs.read("/a/bin") == b"\x00\xff\x00"
            await xs.mkdir("/a/d")
            assert await xs.directory("/a") == ["b", "bin", "d"]
            await xs.rm("/a/b")
            assert await xs.directory("/a") == ["bin", "d"]
            assert await xs.get_perms("/a") == ["n0"]
            await xs.set_perms("/a/d", ["n0", "r5"])
            assert await xs.get_perms("/a/d") == ["n0", "r5"]
            with pytest.raises(XsError) as info:
                await xs.write("bad//path", "x")
            assert info.value.errno_name == "EINVAL"


async def test_domain_operations(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs:
            assert not await xs.is_domain_introduced(7)
            await xs.introduce(7, 1234, 5)
            assert await xs.is_domain_introduced(7)
            assert await xs.get_domain_path(7) == "/local/domain/7"
            await xs.release(7)
            assert not await xs.is_domain_introduced(7)


async def test_large_directory_falls_back_to_directory_part(xenstored: Xenstored) -> None:
    names = [f"child-with-a-fairly-long-name-{i:04d}" for i in range(300)]
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs:

            async def fill(tx: Transaction) -> None:
                for name in names:
                    await tx.write(f"/big/{name}", "")

            await xs.transact(fill)
            assert sum(len(n) + 1 for n in names) > 4096
            assert await xs.directory("/big") == names


async def test_concurrent_requests_are_multiplexed(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs:

            async def worker(i: int) -> None:
                await xs.write(f"/conc/{i}", str(i))
                assert await xs.read_text(f"/conc/{i}") == str(i)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(worker, i)
            assert len(await xs.directory("/conc")) == 200


async def test_watch_initial_event_subtree_and_relative(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs, connect(xenstored.unix) as other:
            async with xs.watch("/w", "tok") as events:
                assert await events.__anext__() == ("/w", "tok")  # immediate first event
                await other.write("/w/x/y", "1")
                assert await events.__anext__() == ("/w/x/y", "tok")
                await other.write("/unrelated", "1")
                await other.rm("/w/x")
                assert await events.__anext__() == ("/w/x", "tok")
            # Unwatched on exit: registering the same token again works.
            async with xs.watch("/w", "tok") as events:
                assert await events.__anext__() == ("/w", "tok")


async def test_transaction_retries_on_conflict(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs, connect(xenstored.unix) as other:
            await xs.write("/counter", "0")
            attempts = 0

            async def increment(tx: Transaction) -> int:
                nonlocal attempts
                attempts += 1
                value = int(await tx.read_text("/counter"))
                if attempts == 1:
                    await other.write("/counter", "10")  # conflicting write outside
                await tx.write("/counter", str(value + 1))
                return value + 1

            assert await xs.transact(increment) == 11
            assert attempts == 2
            assert await xs.read_text("/counter") == "11"


async def test_transaction_sees_own_writes_and_aborts_on_error(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as xs:

            async def body(tx: Transaction) -> None:
                await tx.write("/tx/a", "1")
                assert await tx.read("/tx/a") == b"1"
                assert await xs.try_read("/tx/a") is None  # not visible outside yet
                raise RuntimeError("abort")

            with pytest.raises(RuntimeError):
                await xs.transact(body)
            assert await xs.try_read("/tx/a") is None


async def test_concurrent_increments_all_land(xenstored: Xenstored) -> None:
    with trio.fail_after(60):
        async with connect(xenstored.unix) as a, connect(xenstored.unix) as b:
            await a.write("/n", "0")

            async def inc(tx: Transaction) -> None:
                await tx.write("/n", str(int(await tx.read_text("/n")) + 1))

            async def loop(client: XenstoreClient) -> None:
                for _ in range(20):
                    await client.transact(inc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(loop, a)
                nursery.start_soon(loop, b)
            assert await a.read_text("/n") == "40"


def test_socket_is_private_and_second_server_refused(xenstored: Xenstored) -> None:
    mode = os.stat(xenstored.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpv",
            "xenstored",
            "--socket",
            xenstored.socket,
            "--data-dir",
            str(xenstored.workdir / "other-data"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "another xenstored is serving" in result.stderr
    assert "Traceback" not in result.stderr
    assert xenstored.alive()


def test_stale_socket_is_replaced(xs_workdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(xs_workdir / "socket"))
    stale.close()  # bound, nobody listening: a leftover of a dead server
    server = Xenstored(xs_workdir, tcp=False)
    server.start()
    try:
        assert server.alive()
    finally:
        server.stop()


async def test_connect_to_missing_server_is_a_clear_error(xs_workdir: Path) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(XenstoreConnectionError, match="cannot connect"):
        async with connect(f"unix:{xs_workdir}/nothing"):
            pass


async def test_errors_leave_the_client_context_unwrapped(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(XsError) as info:
            async with connect(xenstored.unix) as xs:
                await xs.read("/missing")
        assert info.value.errno_name == "ENOENT"
        with pytest.raises(KeyError):
            async with connect(xenstored.unix):
                raise KeyError("mine")
