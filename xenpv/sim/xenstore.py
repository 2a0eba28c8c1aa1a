"""xenstored in a simulation: the real server core, connections over in-memory streams.

The server is `XenstoreServer` itself (store, transactions, watches, quotas, group commit,
journal); only its edges change: connections come from `connect` below instead of a
listener, and the journal append always runs inline (the real server may hop to a worker
thread when fsync is slow, and a simulation runs no threads).

A commit costs virtual time (`COMMIT_SECONDS`, a fast disk's fdatasync) instead of a real
sync. Without it, work that goes round through xenstore and nothing else costs no virtual
time at all: a xenbus handshake failing and restarting at once (a connect refused while a
grant fault lasts) would loop forever at one virtual instant, its fault window never ending,
where a real cluster spends real time on every turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from xenpv.faults.xsagent import serve_control
from xenpv.xenstore.client import Address, XenstoreClient, running
from xenpv.xenstore.server import ServerConfig, XenstoreServer, open_store

# Compaction encodes the snapshot in a worker thread: a simulated run never grows its
# journal near this, so it never compacts.
_NEVER_COMPACT = 1 << 62


COMMIT_SECONDS = 100e-6


class SimXenstoreServer(XenstoreServer):
    async def _append(self, payload: bytes) -> None:
        self.journal.append(payload, durable=False)
        await trio.sleep(COMMIT_SECONDS)


class SimXenstored:
    """A running simulated xenstored; `connect(domid)` opens a client connection to it."""

    def __init__(self, server: SimXenstoreServer, nursery: trio.Nursery) -> None:
        self.server = server
        self._nursery = nursery

    def open_stream(self, domid: int) -> trio.abc.Stream:
        client_side, server_side = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self.server._serve_conn, server_side, domid, b"")
        return client_side

    @asynccontextmanager
    async def connect(self, domid: int = 0) -> AsyncIterator[XenstoreClient]:
        async with running(_SimClient(self, domid)) as client:
            yield client


class _SimClient(XenstoreClient):
    """The real client (requests, transactions, watches, reconnect and resend); its stream
    comes from the simulated server instead of a socket."""

    def __init__(self, xenstored: SimXenstored, domid: int) -> None:
        super().__init__(Address("unix", f"sim:{domid}"), None, reconnect_timeout=30.0)
        self.domid = domid
        self._xenstored = xenstored

    async def _open_stream(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        return self._xenstored.open_stream(self.domid)


@asynccontextmanager
async def run_xenstored(data_dir: Path) -> AsyncIterator[SimXenstored]:
    """Run a simulated xenstored whose journal lives in `data_dir` until the block ends."""
    store, journal = open_store(data_dir)
    config = ServerConfig(socket_path="", data_dir=data_dir, compact_min_bytes=_NEVER_COMPACT)
    server = SimXenstoreServer(store, journal, config)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._committer)
            nursery.start_soon(server._stall_watchdog)
            sim = SimXenstored(server, nursery)
            # xenstored's fault agent, as `xenpv xenstored` runs it (xenpv/faults/xsagent.py).
            nursery.start_soon(serve_control, config, sim.connect)
            try:
                yield sim
            finally:
                nursery.cancel_scope.cancel()
    finally:
        journal.close()
