"""Helpers for the hypervisor integration tests: domain pairs and domain processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from xenpv.hv import Domain, LinkFaults, StaticDirectory, open_registered
from xenpv.identity import DomainKey

REPO = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("hv_peer.py")

# (transport setting, endpoint kind): the same tests run on every row.
TRANSPORTS = [("socket", "unix"), ("shm", "unix"), ("socket", "tcp")]
TRANSPORT_IDS = ["socket-unix", "shm", "socket-tcp"]


def endpoint_for(tmp: Path, domid: int, kind: str) -> str:
    return f"unix:{tmp}/dom{domid}.sock" if kind == "unix" else "tcp:127.0.0.1:0"


@asynccontextmanager
async def domains(
    tmp: Path,
    transport: str,
    kind: str,
    domids: tuple[int, ...] = (0, 1),
    *,
    faults: LinkFaults | None = None,
    **options: Any,
) -> AsyncIterator[list[Domain]]:
    """Open domains in this process, all registered in one static directory."""
    directory = StaticDirectory()
    async with AsyncExitStack() as stack:
        yield [
            await open_registered(
                stack,
                directory,
                domid,
                endpoint_for(tmp, domid, kind),
                transport=transport,
                faults=faults,
                memory_bytes=8 << 20,
                **options,
            )
            for domid in domids
        ]


async def open_unix_domains(
    stack: AsyncExitStack,
    directory: StaticDirectory,
    tmp: Path,
    transport: str,
    specs: Iterable[tuple[int, int, int]],
) -> list[Domain]:
    """`open_registered` for each (domid, page size, memory bytes) in `specs`, in order, each
    listening on unix:`tmp`/d<domid>.sock."""
    return [
        await open_registered(
            stack,
            directory,
            domid,
            f"unix:{tmp}/d{domid}.sock",
            transport=transport,
            page_size=page_size,
            memory_bytes=memory_bytes,
        )
        for domid, page_size, memory_bytes in specs
    ]


class PeerProcess:
    """A domain in a child process (tests/integration/hv_peer.py), read line by line."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdout is not None
        self._stdout = process.stdout
        self._buffer = b""

    async def line(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = await self._stdout.receive_some(65536)
            if not chunk:
                raise AssertionError(f"peer process exited (rc={self.process.poll()})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\n")
        result: dict[str, Any] = json.loads(raw)
        return result

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def peer_process(
    role: str,
    domid: int,
    key: DomainKey,
    endpoint: str,
    transport: str,
    peer: Domain,
    *args: Any,
) -> AsyncIterator[PeerProcess]:
    command = [
        sys.executable,
        str(PEER_SCRIPT),
        role,
        str(domid),
        key.seed_hex(),
        endpoint,
        transport,
        str(peer.domid),
        peer.endpoint,
        peer.key.public_hex(),
        *(str(a) for a in args),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, env=env)
    async with reaped_on_exit(process):
        yield PeerProcess(process)


@asynccontextmanager
async def reaped_on_exit(process: trio.Process) -> AsyncIterator[trio.Process]:
    """Leaving the block kills `process` if it still runs, waits for it (even when cancelled,
    so no child outlives its test) and closes its stdout pipe."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def first_line(process: trio.Process, what: str) -> bytes:
    """The first line `process` writes to its stdout (a child's ready report, after which it
    writes nothing), without its newline; fails the test, naming `what` and its exit code, if
    the child exits first."""
    assert process.stdout is not None
    line = b""
    while b"\n" not in line:
        chunk = await process.stdout.receive_some()
        assert chunk, f"{what} exited (rc={process.poll()})"
        line += chunk
    return line.partition(b"\n")[0]


@asynccontextmanager
async def registered_peer(
    role: str,
    domid: int,
    tmp: Path,
    kind: str,
    transport: str,
    peer: Domain,
    directory: StaticDirectory,
    *args: Any,
) -> AsyncIterator[PeerProcess]:
    """`peer_process` with a fresh key, registered in `directory` once it reports ready."""
    key = DomainKey.generate(domid)
    endpoint = endpoint_for(tmp, domid, kind)
    async with peer_process(role, domid, key, endpoint, transport, peer, *args) as process:
        ready = await process.line()
        directory.register(domid, ready["ready"], key.public_hex())
        yield process
