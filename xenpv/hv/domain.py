"""A domain's slice of the hypervisor, in the process hosting it.

`open_domain(...)` starts a domain runtime: its memory, grant table and event-channel ports,
and a listener on its link endpoint. Links to other domains are dialed on demand (the first
map, copy or bind towards a peer) and authenticated both ways (handshake.py). Every handler
of a peer's message is synchronous and runs in link order, so a message's effects are
atomic with respect to this domain's tasks.
"""

from __future__ import annotations

import enum
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.hv import handshake
from xenpv.hv.buffer import XEN_PAGE_SIZE
from xenpv.hv.busypoll import max_window_from_env
from xenpv.hv.directory import PeerDirectory
from xenpv.hv.errors import EventChannelClosed, GrantError, HvError, LinkError, PeerGone
from xenpv.hv.evtchn import EventChannel
from xenpv.hv.faults import LinkFaults
from xenpv.hv.gntst import GNTST, GTF, XENPV_GTF_ORDER_MASK, XENPV_GTF_ORDER_SHIFT
from xenpv.hv.grant import GRANT_ENTRY, GrantTable
from xenpv.hv.link import Link, ProtocolViolation, SharedPeerMemory
from xenpv.hv.mapping import FixedRegion, GrantMapping
from xenpv.hv.memory import DomainMemory, Page
from xenpv.hv.messages import Msg, Whose
from xenpv.identity import DomainKey

if TYPE_CHECKING:
    pass

log = structlog.get_logger()

DEFAULT_MEMORY = 64 << 20
DEFAULT_MAX_GRANTS = 8192  # 16 grant frames of v1 entries
DEFAULT_MAX_MAPS = 4096  # maptrack entries per domain
MAX_PORTS = 4096  # the 2-level event channel ABI on 64-bit guests
TRANSPORTS = ("auto", "shm", "socket")
DIAL_TIMEOUT = 10.0

_OK = int(GNTST.GNTST_okay)
_BAD_COPY = int(GNTST.GNTST_bad_copy_arg)
_BAD_GNTREF = int(GNTST.GNTST_bad_gntref)
_GENERAL = int(GNTST.GNTST_general_error)
_PERMIT = int(GTF.GTF_permit_access)
_TYPE_MASK = int(GTF.GTF_type_mask)
_READONLY = int(GTF.GTF_readonly)
_EINVAL = -22


_GNTST_VALUES = frozenset(int(s) for s in GNTST)
_GRANULE_FRAMES = (1, 2, 4, 8, 16)


def _violation(link: Link, what: str) -> PeerGone:
    """A peer broke the link protocol: drop the link (as if it died) and say why."""
    link.close(f"protocol violation: {what}")
    return PeerGone(f"domain {link.peer} broke the link protocol: {what}")


def _checked_map_reply(link: Link, reply: list[Any], count: int) -> tuple[list[int], list[Any]]:
    try:
        statuses, details = reply
        if len(statuses) != count or any(s not in _GNTST_VALUES for s in statuses):
            raise ValueError("bad statuses")
        if all(s == _OK for s in statuses):
            if len(details) != count:
                raise ValueError("bad details")
            for detail in details:
                if link.shared is None:
                    if not isinstance(detail, bytes) or len(detail) // 4096 not in _GRANULE_FRAMES:
                        raise ValueError("bad replica contents")
                    if len(detail) % 4096:
                        raise ValueError("bad replica contents")
                else:
                    frame, nframes = detail
                    if (
                        type(frame) is not int
                        or nframes not in _GRANULE_FRAMES
                        or not 0 <= frame <= link.shared.nr_frames - nframes
                    ):
                        raise ValueError("frames outside the granter's memory")
    except (ValueError, TypeError) as exc:
        raise _violation(link, f"malformed map reply: {exc}") from None
    return statuses, details


class CopyDirection(enum.IntEnum):
    """Which way a grant-copy segment moves bytes, seen from the local domain."""

    FROM_REMOTE = 0  # the remote grant is the source, the local view the destination
    TO_REMOTE = 1  # the local view is the source, the remote grant the destination


# grant_copy_runs: (local buffer, [(direction, gref, offset, length, at in local), ...])
CopySegment = tuple[int, int, int, int, int]
CopyGroup = tuple[memoryview, Sequence[CopySegment]]


def _move(
    view: memoryview, start: int, local: memoryview, at: int, length: int, write: int
) -> None:
    """One memcpy between the granter's memory and a local buffer."""
    if write:
        view[start : start + length] = local[at : at + length]
    else:
        local[at : at + length] = view[start : start + length]


@dataclass(slots=True)
class CopyOp:
    """One GNTTABOP_copy segment between a local buffer and a remote domain's grant."""

    direction: CopyDirection
    remote: int
    gref: int
    offset: int
    length: int
    local: memoryview


class _AcceptPolicy(handshake.AcceptPolicy):
    """Identity lookups and the tie-break for one incoming link."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain
        self.admitted: int | None = None

    async def pubkey(self, domid: int) -> str:
        return (await self.domain.directory.lookup(domid))[1]

    def admit(self, domid: int) -> bool:
        domain = self.domain
        if domain.link_to(domid) is not None or domid in domain._accepting:
            return False
        if domid in domain._dialing and domain.domid < domid:
            return False  # our own dial wins the tie
        domain._accepting.add(domid)
        self.admitted = domid
        return True


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """`unix:PATH` → ("unix", PATH, 0); `tcp:HOST:PORT` → ("tcp", HOST, PORT)."""
    kind, _, rest = endpoint.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", host.strip("[]"), int(port)
    raise HvError(f"bad link endpoint {endpoint!r} (want unix:PATH or tcp:HOST:PORT)")


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
        self.max_maps = max_maps
        # Test switch only: without it the socket transport can deadlock (docs/hypervisor.md).
        self.coherence_events = coherence_events
        # How long a waiter polls its link before sleeping (busypoll.py); None: the
        # environment's XENPV_BUSY_POLL_US or the default.
        self.busy_poll = max_window_from_env() if busy_poll_us is None else busy_poll_us * 1e-6
        self.memory = DomainMemory(domid, memory_bytes, page_size, max_grants)
        self.grants = GrantTable(domid, self.memory.table, max_grants, self.memory.nr_frames)
        self._layout = handshake.Layout(self.memory.nr_frames, max_grants, self.memory.size)
        self._ports: dict[int, EventChannel] = {}
        self._ports_by_peer: dict[int, set[EventChannel]] = {}
        self._links: dict[int, Link] = {}
        self._dialing: dict[int, trio.Event] = {}
        self._accepting: set[int] = set()
        self._link_ready: dict[int, trio.Event] = {}
        self._maps_in_use = 0
        self._nursery: trio.Nursery | None = None
        self.endpoint = ""
        self._unix_path: str | None = None

    # -- memory ------------------------------------------------------------------------------

    def alloc_pages(self, n: int) -> list[Page]:
        return self.memory.alloc_pages(n)

    def alloc_buffer(self, nframes: int) -> Page:
        return self.memory.alloc_buffer(nframes)

    def free_pages(self, pages: Sequence[Page]) -> None:
        self.memory.free_pages(pages)

    # -- links ---------------------------------------------------------------------------------

    def link_to(self, peer: int) -> Link | None:
        """The live link to `peer`, if any (for inspection: transport, counters)."""
        link = self._links.get(peer)
        return link if link is not None and link.dead is None else None

    async def connect(self, peer: int) -> Link:
        """The live link to `peer`, dialing it if needed."""
        if peer == self.domid:
            raise HvError(f"domain {peer} cannot link to itself")
        while True:
            link = self.link_to(peer)
            if link is not None:
                return link
            dialing = self._dialing.get(peer)
            if dialing is not None:
                await dialing.wait()
                continue
            done = self._dialing[peer] = trio.Event()
            try:
                return await self._dial(peer)
            finally:
                del self._dialing[peer]
                done.set()

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
            established = await handshake.dial(
                stream,
                key=self.key,
                peer=peer,
                peer_pubkey=pubkey,
                transport=self.transport,
                memory_fd=self.memory.fd,
                layout=self._layout,
            )
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
                await self._link_ready.setdefault(peer, trio.Event()).wait()
        raise LinkError(f"lost the link race with domain {peer}")

    def _register(self, stream: trio.SocketStream, est: handshake.Established) -> Link:
        assert self._nursery is not None
        link = Link(
            self,
            est.peer,
            stream,
            shared=est.shared,
            faults=self.faults,
            busy_poll=self.busy_poll,
        )
        self._links[est.peer] = link
        if est.shared is not None:
            self.memory.shm_peers += 1
        ready = self._link_ready.pop(est.peer, None)
        if ready is not None:
            ready.set()
        self._nursery.start_soon(link.run)
        log.debug("link up", domid=self.domid, peer=est.peer, transport=link.transport)
        return link

    async def _serve(self, listener: trio.abc.Listener[trio.SocketStream]) -> None:
        assert self._nursery is not None
        async with listener:
            while True:
                stream = await listener.accept()
                self._nursery.start_soon(self._accept, stream)

    async def _accept(self, stream: trio.SocketStream) -> None:
        policy = _AcceptPolicy(self)
        try:
            est = await handshake.accept(
                stream,
                key=self.key,
                policy=policy,
                transport=self.transport,
                memory_fd=self.memory.fd,
                layout=self._layout,
            )
        except handshake.Duplicate:
            await stream.aclose()
            return
        except (LinkError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("link refused", domid=self.domid, error=str(exc))
            await stream.aclose()
            return
        finally:
            if policy.admitted is not None:
                self._accepting.discard(policy.admitted)
        self._register(stream, est)

    def linked_peers(self) -> list[int]:
        return [peer for peer, link in self._links.items() if link.dead is None]

    def disconnect(self, peer: int, reason: str = "disconnected") -> None:
        """Break the link to `peer` (e.g. the toolstack released it): as if it had died."""
        link = self._links.get(peer)
        if link is not None:
            link.close(reason)

    # -- event channels --------------------------------------------------------------------------

    def _alloc_port(self) -> int:
        for port in range(1, MAX_PORTS):
            if port not in self._ports:
                return port
        raise HvError(f"domain {self.domid}: all {MAX_PORTS} event channel ports in use")

    def _add_port(self, channel: EventChannel) -> EventChannel:
        self._ports[channel.port] = channel
        self._ports_by_peer.setdefault(channel.remote_domid, set()).add(channel)
        return channel

    async def alloc_unbound(self, remote: int) -> EventChannel:
        """EVTCHNOP_alloc_unbound: a port that domain `remote` may bind to."""
        if remote == self.domid:
            raise HvError("an interdomain port needs another domain")
        return self._add_port(EventChannel(self, self._alloc_port(), remote, None))

    async def bind_interdomain(self, remote: int, remote_port: int) -> EventChannel:
        """EVTCHNOP_bind_interdomain: bind a new local port to `remote`'s unbound port."""
        link = await self.connect(remote)
        port = self._alloc_port()
        channel = EventChannel(self, port, remote, None)
        self._ports[port] = channel  # reserve the number while the peer answers
        try:
            reply = await link.call([Msg.BIND, 0, remote_port, port])
            if len(reply) != 1 or type(reply[0]) is not int:
                raise _violation(link, "malformed bind reply")
            status = reply[0]
        except BaseException:
            self._ports.pop(port, None)
            raise
        if status != 0:
            self._ports.pop(port, None)
            raise HvError(
                f"domain {remote} port {remote_port} is not an unbound port for domain "
                f"{self.domid} (status {status})"
            )
        if link.dead is not None:
            self._ports.pop(port, None)
            raise PeerGone(f"domain {remote}: {link.dead}")
        channel.remote_port = remote_port
        return self._add_port(channel)

    def send_event(self, channel: EventChannel) -> None:
        link = self._links.get(channel.remote_domid)
        if link is None or link.dead is not None:
            channel.peer_closed(f"no link to domain {channel.remote_domid}")
            raise EventChannelClosed(f"port {channel.port}: domain {channel.remote_domid} is gone")
        link.send_now([Msg.EVENT, channel.remote_port])

    def event_source(self, channel: EventChannel) -> Link | None:
        """The link a waiter on `channel` may receive from itself (evtchn.EventChannel.wait)."""
        link = self._links.get(channel.remote_domid)
        return link if link is not None and link.dead is None else None

    def close_port(self, channel: EventChannel) -> None:
        if self._ports.get(channel.port) is channel:
            del self._ports[channel.port]
        peers = self._ports_by_peer.get(channel.remote_domid)
        if peers is not None:
            peers.discard(channel)
        if channel.remote_port is not None and not channel.closed:
            link = self._links.get(channel.remote_domid)
            if link is not None and link.dead is None:
                link.send([Msg.CLOSE, channel.remote_port, channel.port])

    # -- grants: mapping -----------------------------------------------------------------------

    async def map_grants(
        self, remote: int, grefs: Sequence[int], *, readonly: bool = False
    ) -> GrantMapping:
        """Map `remote`'s grants side by side (GNTTABOP_map_grant_ref for each).

        All or nothing: a failing reference unmaps the others and raises GrantError with its
        status. Peer death while waiting raises PeerGone.
        """
        grefs = [int(g) for g in grefs]
        if not grefs:
            raise GrantError(GNTST.GNTST_general_error, "no grant references to map")
        if self._maps_in_use + len(grefs) > self.max_maps:
            raise GrantError(GNTST.GNTST_no_space, f"maptrack full ({self.max_maps} entries)")
        link = await self.connect(remote)

        def on_reply(result: list[Any]) -> list[Any]:
            # Runs in the link reader: the mapping exists before the next UPDATE is applied.
            statuses, details = _checked_map_reply(link, result, len(grefs))
            for gref, status in zip(grefs, statuses, strict=True):
                if status != _OK:
                    raise GrantError(status, f"map of domain {remote} grant {gref}")
            try:
                mapping = self._make_mapping(link, grefs, details, readonly)
            except BaseException:
                if link.dead is None:
                    link.send([Msg.UNMAP, 0, grefs, readonly])
                raise
            link.mappings.add(mapping)
            return [mapping]

        def on_abandoned(result: list[Any]) -> list[Any]:
            self._maps_in_use -= len(grefs)
            statuses = result[0] if result and isinstance(result[0], list) else []
            if statuses and all(s == _OK for s in statuses) and link.dead is None:
                link.send([Msg.UNMAP, 0, grefs, readonly])
            return result

        self._maps_in_use += len(grefs)
        try:
            (mapping,) = await link.call(
                [Msg.MAP, 0, grefs, readonly], on_reply=on_reply, on_abandoned=on_abandoned
            )
        except trio.Cancelled:
            raise  # on_abandoned gives the maptrack entries back when the reply comes
        except BaseException:
            self._maps_in_use -= len(grefs)
            raise
        assert isinstance(mapping, GrantMapping)
        return mapping

    def _make_mapping(
        self, link: Link, grefs: list[int], details: list[Any], readonly: bool
    ) -> GrantMapping:
        if link.dead is not None:
            raise PeerGone(f"domain {link.peer}: {link.dead}")
        shared = link.shared
        if shared is None:
            sizes = [len(data) for data in details]
            view = memoryview(bytearray(sum(sizes)))
            offset = 0
            mapping = GrantMapping(link, grefs, sizes, view, readonly, None, self._release_maps)
            for gref, data in zip(grefs, details, strict=True):
                view[offset : offset + len(data)] = data
                link.replicas.setdefault(gref, []).append((mapping, offset))
                offset += len(data)
            return mapping
        runs = [(int(frame), int(nframes)) for frame, nframes in details]
        sizes = [n * XEN_PAGE_SIZE for _f, n in runs]
        if FixedRegion.supported():
            # Map the granter's frames into a region of our own (one mmap per run of
            # consecutive frames): unmap and peer death can then revoke them, as Xen does.
            region = FixedRegion(shared.fd, runs, readonly)
            view = region.view()
            return GrantMapping(link, grefs, sizes, view, readonly, region, self._release_maps)
        consecutive = all(runs[i][0] + runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
        if not consecutive:
            raise HvError("scattered shared-memory mappings need 4 KiB host pages")
        # Fallback (host pages larger than 4 KiB): a slice of the peer's memory, which an
        # unmap cannot revoke from views already taken.
        start = runs[0][0] * XEN_PAGE_SIZE
        view = shared.view[start : start + sum(sizes)]
        return GrantMapping(link, grefs, sizes, view, readonly, None, self._release_maps)

    def _copy_shared(
        self,
        shared: SharedPeerMemory,
        ops: Sequence[CopyOp],
        indexes: Sequence[int],
        results: list[int],
    ) -> None:
        """Grant copy of independent segments through shared memory: validate against the
        granter's own table entry, then one memcpy each. The checks are those of
        `_copy_runs_shared`, inlined again here: going through it (a tuple per segment) made
        4 KiB copies 40% slower."""
        table, nr, view, me = shared.table, shared.nr_grants, shared.view, self.domid
        nr_frames = shared.nr_frames
        unpack = GRANT_ENTRY.unpack_from
        for index in indexes:
            op = ops[index]
            gref, offset, length, local = op.gref, op.offset, op.length, op.local
            if offset < 0 or length < 0 or len(local) != length:
                results[index] = _BAD_COPY
                continue
            if not 0 <= gref < nr:
                results[index] = _BAD_GNTREF
                continue
            flags, domid, frame = unpack(table, gref << 3)
            write = op.direction  # TO_REMOTE is 1
            if flags & _TYPE_MASK != _PERMIT or domid != me or (write and flags & _READONLY):
                results[index] = _GENERAL
                continue
            nframes = 1 << ((flags & XENPV_GTF_ORDER_MASK) >> XENPV_GTF_ORDER_SHIFT)
            if offset + length > nframes << 12 or frame + nframes > nr_frames:
                results[index] = _BAD_COPY
                continue
            start = (frame << 12) + offset
            if write:
                view[start : start + length] = local
            else:
                local[:] = view[start : start + length]

    def _copy_runs_shared(self, shared: SharedPeerMemory, groups: Sequence[CopyGroup]) -> list[int]:
        """Grant copy through shared memory: each segment is validated against the granter's
        own table entry (the checks of `grant.check_entry`, inlined: this is the hot path);
        segments that lie back to back in both memories, same direction, are then moved with
        one memcpy per run (a frame's 4 KiB slots from a guest's contiguous buffer)."""
        table, nr, view, me = shared.table, shared.nr_grants, shared.view, self.domid
        nr_frames = shared.nr_frames
        unpack = GRANT_ENTRY.unpack_from
        results: list[int] = []
        status = results.append
        for local, segments in groups:
            size = len(local)
            run_write = run_src = run_at = run_len = 0
            for write, gref, offset, length, at in segments:
                if offset < 0 or length < 0 or at < 0 or at + length > size:
                    status(_BAD_COPY)
                    continue
                if not 0 <= gref < nr:
                    status(_BAD_GNTREF)
                    continue
                flags, domid, frame = unpack(table, gref << 3)
                if flags & _TYPE_MASK != _PERMIT or domid != me or (write and flags & _READONLY):
                    status(_GENERAL)
                    continue
                nframes = 1 << ((flags & XENPV_GTF_ORDER_MASK) >> XENPV_GTF_ORDER_SHIFT)
                if offset + length > nframes << 12 or frame + nframes > nr_frames:
                    status(_BAD_COPY)
                    continue
                status(_OK)
                src = (frame << 12) + offset
                if (
                    run_len
                    and src == run_src + run_len
                    and at == run_at + run_len
                    and write == run_write
                ):
                    run_len += length
                    continue
                if run_len:
                    _move(view, run_src, local, run_at, run_len, run_write)
                run_write, run_src, run_at, run_len = write, src, at, length
            if run_len:
                _move(view, run_src, local, run_at, run_len, run_write)
        return results

    def _release_maps(self, count: int) -> None:
        self._maps_in_use -= count

    # -- grants: copy ------------------------------------------------------------------------

    async def grant_copy(self, ops: Sequence[CopyOp]) -> list[int]:
        """GNTTABOP_copy: a GNTST status per segment; one link round trip per remote domain."""
        results = [_OK] * len(ops)
        remotes = {op.remote for op in ops}
        if len(remotes) == 1:
            await self._copy_with(remotes.pop(), ops, range(len(ops)), results)
        elif remotes:
            async with trio.open_nursery() as nursery:
                for remote in remotes:
                    indexes = [i for i, op in enumerate(ops) if op.remote == remote]
                    nursery.start_soon(self._copy_with, remote, ops, indexes, results)
        return results

    async def grant_copy_runs(self, remote: int, groups: Sequence[CopyGroup]) -> list[int]:
        """GNTTABOP_copy with one remote domain, segments grouped by local buffer.

        Each segment `(direction, gref, offset, length, at)` moves `length` bytes between
        offset `offset` of `remote`'s grant `gref` and `local[at : at + length]` of its group.
        A GNTST status per segment, flattened in order: the same as `grant_copy` with the
        equivalent CopyOps (which is what the socket transport does). On shared memory,
        segments that are back to back on both sides are copied as one run.
        """
        link = await self.connect(remote)
        shared = link.shared
        if shared is not None:
            statuses = self._copy_runs_shared(shared, groups)
            if link.dead is not None:
                raise PeerGone(f"domain {remote}: {link.dead}")
            return statuses
        # The socket transport: the equivalent CopyOps, after the same bounds checks.
        results: list[int] = []
        ops: list[CopyOp] = []
        indexes: list[int] = []
        for local, segments in groups:
            size = len(local)
            for write, gref, offset, length, at in segments:
                if offset < 0 or length < 0 or at < 0 or at + length > size:
                    results.append(_BAD_COPY)
                    continue
                indexes.append(len(results))
                results.append(_OK)
                view = local[at : at + length]
                ops.append(CopyOp(CopyDirection(write), remote, gref, offset, length, view))
        copied = [_OK] * len(ops)
        await self._copy_with(remote, ops, range(len(ops)), copied)
        for index, status in zip(indexes, copied, strict=True):
            results[index] = status
        return results

    async def _copy_with(
        self, remote: int, ops: Sequence[CopyOp], indexes: Sequence[int], results: list[int]
    ) -> None:
        link = await self.connect(remote)
        shared = link.shared
        if shared is not None:
            self._copy_shared(shared, ops, indexes, results)
            if link.dead is not None:
                raise PeerGone(f"domain {remote}: {link.dead}")
            return
        wire = []
        sent = []
        for index in indexes:
            op = ops[index]
            if op.length < 0 or op.offset < 0 or len(op.local) != op.length:
                results[index] = _BAD_COPY
            elif op.direction == CopyDirection.TO_REMOTE:
                wire.append([True, op.gref, op.offset, op.length, bytes(op.local)])
                sent.append(index)
            else:
                wire.append([False, op.gref, op.offset, op.length, None])
                sent.append(index)
        if not wire:
            return
        indexes = sent
        reply = await link.call([Msg.COPY, 0, wire])
        try:
            statuses, datas = reply
            for index, status, data in zip(indexes, statuses, datas, strict=True):
                op = ops[index]
                if status not in _GNTST_VALUES:
                    raise ValueError(f"status {status!r}")
                if status == _OK and op.direction == CopyDirection.FROM_REMOTE:
                    if not isinstance(data, bytes) or len(data) != op.length:
                        raise ValueError("copy data of the wrong size")
                    op.local[:] = data
                results[index] = status
        except (ValueError, TypeError) as exc:
            raise _violation(link, f"malformed copy reply: {exc}") from None

    # -- incoming messages -----------------------------------------------------------------------

    def handle_message(self, link: Link, message: list[Any]) -> None:
        try:
            kind = message[0]
            if kind == Msg.EVENT:
                channel = self._ports.get(message[1])
                if (
                    channel is not None
                    and channel.remote_domid == link.peer
                    and channel.remote_port is not None
                ):
                    channel.raise_event()
            elif kind == Msg.UPDATE:
                self._on_update(link, message[1])
            elif kind == Msg.COPY:
                self._on_copy(link, message[1], message[2])
            elif kind == Msg.MAP:
                self._on_map(link, message[1], message[2], bool(message[3]))
            elif kind == Msg.UNMAP:
                for gref in message[2]:
                    self._unpin(link, int(gref), bool(message[3]))
                if message[1]:
                    link.reply(message[1])
            elif kind == Msg.BIND:
                self._on_bind(link, message[1], message[2], message[3])
            elif kind == Msg.CLOSE:
                channel = self._ports.get(message[1])
                if (
                    channel is not None
                    and channel.remote_domid == link.peer
                    and channel.remote_port == message[2]
                ):
                    channel.peer_closed(f"domain {link.peer} closed its port {message[2]}")
            else:
                raise ProtocolViolation(f"unknown message type {kind!r}")
        except (IndexError, TypeError, ValueError, KeyError) as exc:
            raise ProtocolViolation(f"malformed message {message!r:.80}: {exc}") from None

    def _on_bind(self, link: Link, request_id: int, port: int, binder_port: int) -> None:
        channel = self._ports.get(port)
        if (
            channel is None
            or channel.closed
            or channel.remote_domid != link.peer
            or channel.remote_port is not None
            or not isinstance(binder_port, int)
        ):
            link.reply(request_id, _EINVAL)
            return
        channel.remote_port = binder_port
        link.reply(request_id, 0)

    def _on_map(self, link: Link, request_id: int, grefs: list[int], readonly: bool) -> None:
        # Each reference gets its own status, as in a GNTTABOP_map_grant_ref batch; the
        # mapping is all or nothing, so on any failure the successful pins are undone.
        statuses: list[int] = []
        details: list[Any] = []
        pinned: list[int] = []
        for gref in grefs:
            status, frame, nframes = self.grants.pin(int(gref), link.peer, readonly)
            statuses.append(status)
            if status != _OK:
                continue
            pinned.append(int(gref))
            if link.shared is not None:
                details.append([frame, nframes])
            else:
                details.append(bytes(self.memory.frame_view(frame, nframes)))
        if len(pinned) != len(grefs):
            for gref in pinned:
                self.grants.unpin(gref, readonly)
            link.reply(request_id, statuses, None)
            return
        for gref in pinned:
            pins = link.pins.setdefault(gref, [0, 0])
            if pins == [0, 0] and link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.watch(entry.frame, 1 << entry.order, link, gref)
            pins[0 if readonly else 1] += 1
        link.reply(request_id, statuses, details)

    def _unpin(self, link: Link, gref: int, readonly: bool) -> None:
        pins = link.pins.get(gref)
        index = 0 if readonly else 1
        if pins is None or pins[index] == 0:
            return  # unknown or duplicate unmap: ignore, as Xen ignores a stale handle
        pins[index] -= 1
        self.grants.unpin(gref, readonly)
        if pins == [0, 0]:
            del link.pins[gref]
            if link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.unwatch(entry.frame, 1 << entry.order, link, gref)

    def _on_copy(self, link: Link, request_id: int, ops: list[list[Any]]) -> None:
        statuses: list[int] = []
        datas: list[bytes | None] = []
        memory = self.memory
        for to_granter, gref, offset, length, data in ops:
            status, frame, nframes = self.grants.check(int(gref), link.peer, bool(to_granter))
            if status == _OK and (
                offset < 0
                or length < 0
                or offset + length > nframes << 12
                or (to_granter and (not isinstance(data, bytes) or len(data) != length))
            ):
                status = _BAD_COPY
            statuses.append(status)
            if status != _OK:
                datas.append(None)
                continue
            start = (frame << 12) + offset
            if to_granter:
                memory.view[start : start + length] = data
                memory.written(start, length, exclude=link)
                datas.append(None)
            else:
                datas.append(bytes(memory.view[start : start + length]))
        link.reply(request_id, statuses, datas)

    def _on_update(self, link: Link, entries: list[list[Any]]) -> None:
        link.updates_received += 1
        memory = self.memory
        changed = False
        for whose, gref, offset, data in entries:
            if whose == Whose.SENDER:
                # The granter changed memory we replicate.
                for mapping, base in link.replicas.get(gref, ()):
                    changed = mapping.apply(base, offset, data) or changed
            else:
                # A mapper wrote to our grant: it must hold a writable pin on it.
                pins = link.pins.get(gref)
                if pins is None or pins[1] == 0:
                    raise ProtocolViolation(f"update of grant {gref} not mapped writable")
                entry = self.grants.entry(gref)
                if offset < 0 or offset + len(data) > (1 << entry.order) << 12:
                    raise ProtocolViolation(f"update outside grant {gref}")
                start = (entry.frame << 12) + offset
                if memory.view[start : start + len(data)] == data:
                    continue  # a rewrite of what we hold: nothing new for anyone
                memory.view[start : start + len(data)] = data
                memory.written(start, len(data), exclude=link)
                changed = True
        if self.coherence_events and changed:
            # The Dekker rule: new shared bytes from the peer may be an index we decided not
            # to wait for; every port bound to the peer re-checks (a spurious event). An
            # UPDATE that changed no byte carries nothing to re-check: raising on it lets two
            # idle ends wake each other forever (each wake rewrites its event index).
            for channel in self._ports_by_peer.get(link.peer, ()):
                if channel.remote_port is not None and not channel.pending:
                    channel.raise_event()

    def link_died(self, link: Link) -> None:
        if self._links.get(link.peer) is link:
            del self._links[link.peer]
        if link.shared is not None:
            self.memory.shm_peers -= 1
            with suppress(OSError):
                os.close(link.shared.fd)
        reason = f"domain {link.peer} is gone ({link.dead})"
        for channel in list(self._ports_by_peer.get(link.peer, ())):
            if channel.remote_port is not None:
                channel.peer_closed(reason)
        for mapping in list(link.mappings):
            mapping.kill(reason)
        link.mappings.clear()
        link.replicas.clear()
        for gref, (reads, writes) in list(link.pins.items()):
            for _ in range(reads):
                self.grants.unpin(gref, True)
            for _ in range(writes):
                self.grants.unpin(gref, False)
            if link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.unwatch(entry.frame, 1 << entry.order, link, gref)
        link.pins.clear()
        log.info("link down", domid=self.domid, peer=link.peer, reason=link.dead)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _listen(self, endpoint: str) -> trio.abc.Listener[trio.SocketStream]:
        kind, where, port = parse_endpoint(endpoint)
        if kind == "unix":
            with suppress(FileNotFoundError):
                os.unlink(where)
            sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await sock.bind(where)
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


@asynccontextmanager
async def open_domain(
    *,
    domid: int,
    key: DomainKey,
    directory: PeerDirectory,
    endpoint: str,
    name: str = "",
    page_size: int = XEN_PAGE_SIZE,
    memory_bytes: int = DEFAULT_MEMORY,
    transport: str = "auto",
    faults: LinkFaults | None = None,
    max_grants: int = DEFAULT_MAX_GRANTS,
    max_maps: int = DEFAULT_MAX_MAPS,
    coherence_events: bool = True,
    busy_poll_us: float | None = None,
) -> AsyncIterator[Domain]:
    """Run a domain: listen on `endpoint` (`unix:PATH` or `tcp:HOST:PORT`, port 0 = any;
    `domain.endpoint` is the bound address). Leaving the block closes every link.

    Peers released by the toolstack are the runtime's business
    (`xenpv.runtime.lifecycle.open_published_domain`): the hypervisor knows no xenstore."""
    domain = Domain(
        domid=domid,
        key=key,
        directory=directory,
        name=name,
        page_size=page_size,
        memory_bytes=memory_bytes,
        transport=transport,
        faults=faults,
        max_grants=max_grants,
        max_maps=max_maps,
        coherence_events=coherence_events,
        busy_poll_us=busy_poll_us,
    )
    try:
        listener = await domain._listen(endpoint)
    except OSError as exc:
        raise HvError(
            f"domain {domid} cannot listen on {endpoint}: {exc.strerror or exc}"
        ) from None
    try:
        async with trio.open_nursery() as nursery:
            domain._nursery = nursery
            nursery.start_soon(domain._serve, listener)
            try:
                yield domain
            finally:
                for link in list(domain._links.values()):
                    link.close("domain shut down")
                nursery.cancel_scope.cancel()
    finally:
        domain.memory.close()
        if domain._unix_path is not None:
            with suppress(OSError):
                os.unlink(domain._unix_path)
