"""A domain's links to its peers: listening, dialing on first use, accepting, and the
simultaneous-dial tie-break (the link dialed by the lower domid wins; handshake.py).

`PeerLinks.run` accepts peers and runs every link's tasks in its own nursery; a link that
dies is forgotten (`forget`) and the next operation towards its peer dials again.
"""

from __future__ import annotations

import os
import socket
from contextlib import suppress
from typing import Protocol

import structlog
import trio

from xenpv.address import split_address
from xenpv.hv import handshake
from xenpv.hv.directory import PeerDirectory
from xenpv.hv.errors import HvError, LinkError, PeerGone
from xenpv.hv.faults import LinkFaults
from xenpv.hv.link import Link, LinkHost
from xenpv.hv.memory import DomainMemory
from xenpv.identity import DomainKey

log = structlog.get_logger()

TRANSPORTS = ("auto", "shm", "socket")
DIAL_TIMEOUT = 10.0


class LinkOwner(LinkHost, Protocol):
    def link_up(self, link: Link) -> None:
        """A new link is registered; its reader has not started yet."""
        ...


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """`unix:PATH` → ("unix", PATH, 0); `tcp:HOST:PORT` → ("tcp", HOST, PORT)."""
    parsed = split_address(endpoint)
    if parsed is not None:
        return parsed
    raise HvError(f"bad link endpoint {endpoint!r} (want unix:PATH or tcp:HOST:PORT)")


class _AcceptPolicy(handshake.AcceptPolicy):
    """Identity lookups and the tie-break for one incoming link."""

    def __init__(self, links: PeerLinks) -> None:
        self.links = links
        self.admitted: int | None = None

    async def pubkey(self, domid: int) -> str:
        return (await self.links.directory.lookup(domid))[1]

    def admit(self, domid: int) -> bool:
        links = self.links
        if links.link_to(domid) is not None or domid in links.accepting:
            return False
        if domid in links.dialing and links.domid < domid:
            return False  # our own dial wins the tie
        links.accepting.add(domid)
        self.admitted = domid
        return True


class PeerLinks:
    """The links of one domain, keyed by peer domid."""

    def __init__(
        self,
        *,
        owner: LinkOwner,
        key: DomainKey,
        directory: PeerDirectory,
        memory: DomainMemory,
        layout: handshake.Layout,
        transport: str,
        faults: LinkFaults | None,
        busy_poll: float,
    ) -> None:
        if transport not in TRANSPORTS:
            raise HvError(f"transport {transport!r} not one of {TRANSPORTS}")
        self.domid = key.domid
        self.key = key
        self.directory = directory
        self.transport = transport
        self.faults = faults
        self.busy_poll = busy_poll
        self._owner = owner
        self._memory = memory
        self._layout = layout
        self._links: dict[int, Link] = {}
        self.dialing: dict[int, trio.Event] = {}  # peers we are dialing (the tie-break)
        self.accepting: set[int] = set()  # peers whose dial we are accepting
        self._ready: dict[int, trio.Event] = {}  # set when a link to the peer is registered
        self._nursery: trio.Nursery | None = None
        self.endpoint = ""
        self._unix_path: str | None = None

    def set_faults(self, faults: LinkFaults | None) -> None:
        """Install (or, with None, remove) the fault seam on every link, now and later."""
        self.faults = faults
        for link in self._links.values():
            link.set_faults(faults)

    def link_to(self, peer: int) -> Link | None:
        """The live link to `peer`, if any."""
        link = self._links.get(peer)
        return link if link is not None and link.dead is None else None

    def linked_peers(self) -> list[int]:
        return [peer for peer, link in self._links.items() if link.dead is None]

    def disconnect(self, peer: int, reason: str) -> None:
        link = self._links.get(peer)
        if link is not None:
            link.close(reason)

    def close_all(self, reason: str) -> None:
        for link in list(self._links.values()):
            link.close(reason)

    def forget(self, link: Link) -> None:
        """`link` died: drop it (unless a newer link to its peer replaced it already)."""
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        if link.shared is not None:
            self._memory.shm_peers -= 1
            with suppress(OSError):
                os.close(link.shared.fd)

    # -- dialing -------------------------------------------------------------------------------

    async def connect(self, peer: int) -> Link:
        """The live link to `peer`, dialing it if needed."""
        if peer == self.domid:
            raise HvError(f"domain {peer} cannot link to itself")
        while True:
            link = self.link_to(peer)
            if link is not None:
                return link
            dialing = self.dialing.get(peer)
            if dialing is not None:
                await dialing.wait()
                continue
            done = self.dialing[peer] = trio.Event()
            try:
                return await self._dial(peer)
            finally:
                del self.dialing[peer]
                done.set()

    def _terms(self) -> handshake.Terms:
        return handshake.Terms(self.key, self.transport, self._memory.fd, self._layout)

    async def _dial(self, peer: int) -> Link:
        endpoint, pubkey = await self.directory.lookup(peer)
        kind, where, port = parse_endpoint(endpoint)
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                if kind == "unix":
                    stream = await trio.open_unix_socket(where)
                else:
                    stream = await trio.open_tcp_stream(where, port)
        except (OSError, trio.TooSlowError) as exc:
            raise PeerGone(f"cannot reach domain {peer} at {endpoint}: {exc}") from None
        try:
            established = await handshake.dial(stream, self._terms(), peer=peer, peer_pubkey=pubkey)
        except handshake.Duplicate:
            await stream.aclose()
            return await self._await_accepted(peer)
        except (LinkError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            await stream.aclose()
            if isinstance(exc, LinkError):
                raise
            raise PeerGone(f"domain {peer} dropped the link handshake: {exc}") from None
        return self._register(stream, established)

    async def _await_accepted(self, peer: int) -> Link:
        with trio.move_on_after(DIAL_TIMEOUT):
            while True:
                link = self.link_to(peer)
                if link is not None:
                    return link
                await self._ready.setdefault(peer, trio.Event()).wait()
        raise LinkError(f"lost the link race with domain {peer}")

    def _register(self, stream: trio.SocketStream, est: handshake.Established) -> Link:
        nursery = self._nursery
        if nursery is None:
            stream.socket.close()
            if est.shared is not None:
                with suppress(OSError):
                    os.close(est.shared.fd)
            raise HvError(f"domain {self.domid} is not running")
        link = Link(
            self._owner,
            est.peer,
            stream,
            shared=est.shared,
            faults=self.faults,
            busy_poll=self.busy_poll,
        )
        self._links[est.peer] = link
        if est.shared is not None:
            self._memory.shm_peers += 1
        self._owner.link_up(link)
        ready = self._ready.pop(est.peer, None)
        if ready is not None:
            ready.set()
        nursery.start_soon(link.run)
        log.debug("link up", domid=self.domid, peer=est.peer, transport=link.transport)
        return link

    # -- listening -----------------------------------------------------------------------------

    async def listen(self, endpoint: str) -> trio.abc.Listener[trio.SocketStream]:
        """Bind `endpoint` (`self.endpoint` becomes the bound address); `run` accepts on it."""
        kind, where, port = parse_endpoint(endpoint)
        if kind == "unix":
            with suppress(FileNotFoundError):
                os.unlink(where)
            # Bound synchronously: trio's `bind` of a Unix path hops to a worker thread, which
            # a simulated run (xenpv/sim/) cannot have; binding a local path is quick anyway.
            plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                plain.bind(where)
            except BaseException:
                plain.close()
                raise
            sock = trio.socket.from_stdlib_socket(plain)
            await trio.lowlevel.checkpoint()
            os.chmod(where, 0o600)
            sock.listen(128)
            self._unix_path = where
            self.endpoint = endpoint
            return trio.SocketListener(sock)
        listeners = await trio.open_tcp_listeners(port, host=where)
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        bound = listener.socket.getsockname()
        self.endpoint = f"tcp:{where}:{bound[1]}"
        return listener

    def remove_socket(self) -> None:
        """Remove the Unix socket `listen` created, if any."""
        if self._unix_path is not None:
            with suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None

    async def run(
        self,
        listener: trio.abc.Listener[trio.SocketStream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept peers on `listener` and run every link, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                async with listener:
                    while True:
                        stream = await listener.accept()
                        nursery.start_soon(self._accept, stream)
        finally:
            self._nursery = None

    async def _accept(self, stream: trio.SocketStream) -> None:
        policy = _AcceptPolicy(self)
        try:
            est = await handshake.accept(stream, self._terms(), policy=policy)
        except handshake.Duplicate:
            await stream.aclose()
            return
        except (LinkError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("link refused", domid=self.domid, error=str(exc))
            await stream.aclose()
            return
        finally:
            if policy.admitted is not None:
                self.accepting.discard(policy.admitted)
        self._register(stream, est)
