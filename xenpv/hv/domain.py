"""A domain's slice of the hypervisor, in the process hosting it.

`open_domain(...)` starts a domain runtime: its memory, grant table and event-channel ports,
and a listener on its link endpoint. `Domain` is the facade drivers use; the work is done by
its parts, one idea each:

- peerlinks.py: links to peers (listen, dial on first use, accept, the simultaneous-dial
  tie-break), authenticated both ways (handshake.py);
- ports.py: event channels, the domain side;
- mapper.py: mapping and copying peers' grants (copyengine.py: the copy itself, no I/O);
- granter.py: serving peers' map, unmap, copy and replica writes against our grants;
- peergrants.py: what each link holds of grants (pins, mappings, replicas).

Every handler of a peer's message is synchronous and runs in link order (`handle_message`),
so a message's effects are atomic with respect to this domain's tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypedDict, Unpack

import structlog
import trio

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.hv import handshake
from xenpv.hv.busypoll import max_window_from_env
from xenpv.hv.copyengine import CopyDirection, CopyGroup, CopyOp, CopySegment
from xenpv.hv.directory import PeerDirectory, StaticDirectory
from xenpv.hv.errors import HvError, PeerGone
from xenpv.hv.evtchn import EventChannel
from xenpv.hv.faults import LinkFaults
from xenpv.hv.gntst import READING, WRITING
from xenpv.hv.grant import GrantTable
from xenpv.hv.granter import Granter
from xenpv.hv.link import Link
from xenpv.hv.mapper import GrantMapper
from xenpv.hv.mapping import GrantMapping
from xenpv.hv.memory import DomainMemory, Page
from xenpv.hv.messages import (
    Bind,
    Close,
    CopyRequest,
    Event,
    MapRequest,
    Message,
    ProtocolViolation,
    Revoke,
    UnmapRequest,
    Update,
    Whose,
)
from xenpv.hv.peergrants import PeerGrants
from xenpv.hv.peerlinks import DIAL_TIMEOUT, TRANSPORTS, PeerLinks, parse_endpoint
from xenpv.hv.ports import MAX_PORTS, PortTable
from xenpv.identity import DomainKey
from xenpv.metrics.registry import REGISTRY

__all__ = [
    "DEFAULT_MAX_GRANTS",
    "DEFAULT_MAX_MAPS",
    "DEFAULT_MEMORY",
    "DIAL_TIMEOUT",
    "MAX_PORTS",
    "TRANSPORTS",
    "CopyDirection",
    "CopyGroup",
    "CopyOp",
    "CopySegment",
    "Domain",
    "open_domain",
    "parse_endpoint",
]

_MAPPED = READING | WRITING
log = structlog.get_logger()

DEFAULT_MEMORY = 64 << 20
DEFAULT_MAX_GRANTS = 8192  # 16 grant frames of v1 entries
DEFAULT_MAX_MAPS = 4096  # maptrack entries per domain


class Domain:
    """One domain: memory, grant table, ports, and links to its peers."""

    def __init__(
        self,
        *,
        domid: int,
        key: DomainKey,
        directory: PeerDirectory,
        name: str = "",
        page_size: int = XEN_PAGE_SIZE,
        memory_bytes: int = DEFAULT_MEMORY,
        transport: str = "auto",
        faults: LinkFaults | None = None,
        max_grants: int = DEFAULT_MAX_GRANTS,
        max_maps: int = DEFAULT_MAX_MAPS,
        coherence_events: bool = True,
        busy_poll_us: float | None = None,
        max_ports: int = MAX_PORTS,
    ) -> None:
        if key.domid != domid:
            raise HvError(f"key is for domain {key.domid}, not {domid}")
        if transport not in TRANSPORTS:
            raise HvError(f"transport {transport!r} not one of {TRANSPORTS}")
        self.domid = domid
        self.name = name or f"dom{domid}"
        self.key = key
        self.directory = directory
        self.page_size = page_size
        self.transport = transport
        self.faults = faults
        # Test switch only: without it the socket transport can deadlock (docs/hypervisor.md).
        self.coherence_events = coherence_events
        # How long a waiter polls its link before sleeping (busypoll.py); None: the
        # environment's XENPV_BUSY_POLL_US or the default.
        self.busy_poll = max_window_from_env() if busy_poll_us is None else busy_poll_us * 1e-6
        self.memory = DomainMemory(domid, memory_bytes, page_size, max_grants)
        self.grants = GrantTable(domid, self.memory.table, max_grants, self.memory.nr_frames)
        self.stats = REGISTRY.domain(domid, self.name)  # docs/metrics.md
        self.grants.stats = self.stats.grants
        self.links = PeerLinks(
            owner=self,
            key=key,
            directory=directory,
            memory=self.memory,
            layout=handshake.Layout(self.memory.nr_frames, max_grants, self.memory.size),
            transport=transport,
            faults=faults,
            busy_poll=self.busy_poll,
        )
        self.ports = PortTable(domid, self.links, max_ports)
        self.granter = Granter(self.grants, self.memory)
        self.mapper = GrantMapper(domid, self.links, self.peer_grants, max_maps)
        # Per live link rather than per peer: a link that is dying may still be torn down
        # after a new link to the same peer came up, and must drop only its own pins.
        self._held: dict[Link, PeerGrants] = {}

    @property
    def endpoint(self) -> str:
        """Where this domain's links are accepted (the bound address once listening)."""
        return self.links.endpoint

    @property
    def max_maps(self) -> int:
        return self.mapper.max_maps

    # -- memory ------------------------------------------------------------------------------

    def alloc_pages(self, n: int) -> list[Page]:
        return self.memory.alloc_pages(n)

    def alloc_buffer(self, nframes: int) -> Page:
        return self.memory.alloc_buffer(nframes)

    def free_pages(self, pages: Sequence[Page]) -> None:
        self.memory.free_pages(pages)

    # -- links ---------------------------------------------------------------------------------

    def set_link_faults(self, faults: LinkFaults | None) -> None:
        """Install (None: remove) the link fault seam at run time, on every link."""
        self.faults = faults
        self.links.set_faults(faults)

    def link_to(self, peer: int) -> Link | None:
        """The live link to `peer`, if any (for inspection: transport, counters)."""
        return self.links.link_to(peer)

    async def connect(self, peer: int) -> Link:
        """The live link to `peer`, dialing it if needed."""
        return await self.links.connect(peer)

    def linked_peers(self) -> list[int]:
        return self.links.linked_peers()

    def disconnect(self, peer: int, reason: str = "disconnected") -> None:
        """Break the link to `peer` (e.g. the toolstack released it): as if it had died."""
        self.links.disconnect(peer, reason)

    # -- event channels ----------------------------------------------------------------------

    async def alloc_unbound(self, remote: int) -> EventChannel:
        """EVTCHNOP_alloc_unbound: a port that domain `remote` may bind to."""
        return self.ports.alloc_unbound(remote)

    async def bind_interdomain(self, remote: int, remote_port: int) -> EventChannel:
        """EVTCHNOP_bind_interdomain: bind a new local port to `remote`'s unbound port."""
        return await self.ports.bind_interdomain(remote, remote_port)

    # -- grants (mapper side) ----------------------------------------------------------------

    async def map_grants(
        self, remote: int, grefs: Sequence[int], *, readonly: bool = False
    ) -> GrantMapping:
        """Map `remote`'s grants side by side (GNTTABOP_map_grant_ref for each).

        All or nothing: a failing reference unmaps the others and raises GrantError with its
        status. Peer death while waiting raises PeerGone.
        """
        return await self.mapper.map_grants(remote, grefs, readonly=readonly)

    async def grant_copy(self, ops: Sequence[CopyOp]) -> list[int]:
        """GNTTABOP_copy: a GNTST status per segment; one link round trip per remote domain."""
        return await self.mapper.grant_copy(ops)

    async def grant_copy_runs(self, remote: int, groups: Sequence[CopyGroup]) -> list[int]:
        """GNTTABOP_copy with one remote domain, segments grouped by local buffer (see
        `GrantMapper.grant_copy_runs`)."""
        return await self.mapper.grant_copy_runs(remote, groups)

    # -- grants (granter side) ------------------------------------------------------------

    def revoke_access(self, gref: int) -> bool:
        """What a hostile granter does and Xen refuses (`grants.end_access` fails while
        mapped): end `gref` by force while a peer maps it (`GrantTable.revoke`). Each peer
        holding it loses its pins and is told (REVOKE): its mappings of it die, and its next
        access faults with GrantError. False if the grant was not mapped."""
        if not self.grants.entry(gref).flags & _MAPPED:
            return False
        holders = [(link, held) for link, held in self._held.items() if gref in held.pins]
        for link, held in holders:
            self.granter.forget_pins(link, held, gref)  # reads the entry: before revoke
        if not self.grants.revoke(gref):
            return False
        for link, _held in holders:
            if link.dead is None:
                link.send(Revoke([gref]))
        return True

    # -- the links' host -----------------------------------------------------------------------

    def peer_grants(self, link: Link) -> PeerGrants:
        """What `link` holds of grants (PeerGone once it is torn down)."""
        held = self._held.get(link)
        if held is None:
            raise PeerGone(f"domain {link.peer}: {link.dead or 'link torn down'}")
        return held

    def link_up(self, link: Link) -> None:
        self._held[link] = PeerGrants()
        link.stats = self.stats.peer(link.peer)

    def handle_message(self, link: Link, message: Message) -> None:
        """A message from the peer of `link` (not a reply), in link order."""
        try:
            if type(message) is Event:
                link.stats.events_received += 1
                self.ports.on_event(link.peer, message)
            elif type(message) is Update:
                self._on_update(link, message)
            elif type(message) is CopyRequest:
                self.granter.on_copy(link, message)
            elif type(message) is MapRequest:
                self.granter.on_map(link, self._held[link], message)
            elif type(message) is UnmapRequest:
                self.granter.on_unmap(link, self._held[link], message)
            elif type(message) is Bind:
                self.ports.on_bind(link, message)
            elif type(message) is Close:
                self.ports.on_close(link.peer, message)
            elif type(message) is Revoke:
                reason = f"grant revoked by domain {link.peer} while mapped"
                self._held[link].revoke_mappings({int(g) for g in message.grefs}, reason)
            else:
                raise ProtocolViolation(f"unexpected message {message!r:.80}")
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            raise ProtocolViolation(f"malformed message {message!r:.80}: {exc}") from None

    def _on_update(self, link: Link, update: Update) -> None:
        link.updates_received += 1
        held = self._held[link]
        changed = False
        for whose, gref, offset, data in update.entries:
            if whose == Whose.SENDER:  # the peer's memory we replicate
                changed = held.apply_granter_write(gref, offset, data) or changed
            else:
                changed = self.granter.on_mapper_write(link, held, gref, offset, data) or changed
        if self.coherence_events and changed:
            # The Dekker rule: new shared bytes from the peer may be an index we decided not
            # to wait for; every port bound to the peer re-checks (a spurious event). An
            # UPDATE that changed no byte carries nothing to re-check: raising on it lets two
            # idle ends wake each other forever (each wake rewrites its event index).
            self.ports.raise_all(link.peer)

    def link_died(self, link: Link) -> None:
        """`link` is dead: its ports close, its mappings die, its pins on our grants go."""
        self.links.forget(link)
        reason = f"domain {link.peer} is gone ({link.dead})"
        self.ports.peer_gone(link.peer, reason)
        held = self._held.pop(link, None)
        if held is not None:
            held.kill_mappings(reason)
            self.granter.drop_pins(link, held)
        log.info("link down", domid=self.domid, peer=link.peer, reason=link.dead)


class DomainOptions(TypedDict, total=False):
    """The optional settings of a `Domain`; their defaults are those of `Domain`."""

    name: str
    page_size: int
    memory_bytes: int
    transport: str
    faults: LinkFaults | None
    max_grants: int
    max_maps: int
    coherence_events: bool
    busy_poll_us: float | None
    max_ports: int


@asynccontextmanager
async def open_domain(
    *,
    domid: int,
    key: DomainKey,
    directory: PeerDirectory,
    endpoint: str,
    **options: Unpack[DomainOptions],
) -> AsyncIterator[Domain]:
    """Run a domain: listen on `endpoint` (`unix:PATH` or `tcp:HOST:PORT`, port 0 = any;
    `domain.endpoint` is the bound address). Leaving the block closes every link.

    Peers released by the toolstack are the runtime's business
    (`xenpv.runtime.lifecycle.open_published_domain`): the hypervisor knows no xenstore."""
    domain = Domain(domid=domid, key=key, directory=directory, **options)
    try:
        try:
            listener = await domain.links.listen(endpoint)
        except OSError as exc:
            raise HvError(
                f"domain {domid} cannot listen on {endpoint}: {exc.strerror or exc}"
            ) from None
        async with trio.open_nursery() as nursery:
            await nursery.start(domain.links.run, listener)
            try:
                yield domain
            finally:
                domain.links.close_all("domain shut down")
                nursery.cancel_scope.cancel()
    finally:
        domain.memory.close()
        domain.links.remove_socket()


async def open_registered(
    stack: AsyncExitStack,
    directory: StaticDirectory,
    domid: int,
    endpoint: str,
    **options: Unpack[DomainOptions],
) -> Domain:
    """`open_domain` with a fresh key for the life of `stack`, registered in `directory` at its
    bound endpoint (`options` go to `open_domain`: transport, page_size, memory_bytes, ...)."""
    key = DomainKey.generate(domid)
    domain = await stack.enter_async_context(
        open_domain(domid=domid, key=key, directory=directory, endpoint=endpoint, **options)
    )
    directory.register(domid, domain.endpoint, key.public_hex())
    return domain
