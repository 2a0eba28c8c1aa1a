"""Event channels, the domain side: a domain's port table and the EVTCHNOP operations that
involve a peer (alloc_unbound, bind_interdomain, send, close), with the handlers of the peer's
EVENT, BIND and CLOSE messages. The port itself (pending bit, mask, wait) is evtchn.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from xenpv.hv.errors import EventChannelClosed, HvError, PeerGone
from xenpv.hv.evtchn import EventChannel
from xenpv.hv.link import Link
from xenpv.hv.messages import Bind, BindReply, Close, Event
from xenpv.hv.peerlinks import PeerLinks

MAX_PORTS = 4096  # the 2-level event channel ABI on 64-bit guests
FIFO_MAX_PORTS = 1 << 17  # the FIFO ABI (EVTCHN_FIFO_NR_CHANNELS): what a driver domain gets
_EINVAL = -22


class EventFaults(Protocol):
    """The fault seam of outgoing event notifications (a fault run's agent implements it;
    None, the default, costs one check per notification)."""

    def on_event(self, channel: EventChannel, send: Callable[[], None]) -> bool:
        """False: send normally. True: the seam took it (dropped it, or calls `send` itself,
        later or more than once)."""
        ...


class PortTable:
    """One domain's event-channel ports (the `PortOwner` of its `EventChannel`s)."""

    def __init__(self, domid: int, links: PeerLinks, max_ports: int = MAX_PORTS) -> None:
        self.domid = domid
        self.max_ports = max_ports
        self._links = links
        self._ports: dict[int, EventChannel] = {}
        # Per peer, in binding order (a dict as an ordered set: a set of objects iterates in
        # address order, which a simulated run could not reproduce).
        self._by_peer: dict[int, dict[EventChannel, None]] = {}
        self._lowest_free = 1  # no port below it is free: allocation stays O(1) amortised
        self.faults: EventFaults | None = None

    def open_count(self) -> int:
        """Ports open (allocated or bound), for leak checks."""
        return len(self._ports)

    def _alloc_port(self) -> int:
        for port in range(self._lowest_free, self.max_ports):
            if port not in self._ports:
                self._lowest_free = port + 1
                return port
        raise HvError(f"domain {self.domid}: all {self.max_ports} event channel ports in use")

    def _release(self, port: int) -> None:
        if self._ports.pop(port, None) is not None:
            self._lowest_free = min(self._lowest_free, port)

    def _add(self, channel: EventChannel) -> EventChannel:
        self._ports[channel.port] = channel
        self._by_peer.setdefault(channel.remote_domid, {})[channel] = None
        return channel

    def alloc_unbound(self, remote: int) -> EventChannel:
        """EVTCHNOP_alloc_unbound: a port that domain `remote` may bind to."""
        if remote == self.domid:
            raise HvError("an interdomain port needs another domain")
        return self._add(EventChannel(self, self._alloc_port(), remote, None))

    async def bind_interdomain(self, remote: int, remote_port: int) -> EventChannel:
        """EVTCHNOP_bind_interdomain: bind a new local port to `remote`'s unbound port."""
        link = await self._links.connect(remote)
        port = self._alloc_port()
        channel = EventChannel(self, port, remote, None)
        self._ports[port] = channel  # reserve the number while the peer answers
        try:
            reply = await link.call(Bind(0, remote_port, port), BindReply)
            if type(reply.status) is not int:
                raise link.violation("malformed bind reply")
        except BaseException:
            self._release(port)
            raise
        if reply.status != 0:
            self._release(port)
            raise HvError(
                f"domain {remote} port {remote_port} is not an unbound port for domain "
                f"{self.domid} (status {reply.status})"
            )
        if link.dead is not None:
            self._release(port)
            raise PeerGone(f"domain {remote}: {link.dead}")
        channel.remote_port = remote_port
        return self._add(channel)

    # -- PortOwner (evtchn.py) ---------------------------------------------------------------

    def send_event(self, channel: EventChannel) -> None:
        link = self._links.link_to(channel.remote_domid)
        if link is None:
            channel.peer_closed(f"no link to domain {channel.remote_domid}")
            raise EventChannelClosed(f"port {channel.port}: domain {channel.remote_domid} is gone")
        assert channel.remote_port is not None  # notify() sends on bound ports only
        link.stats.events_sent += 1
        if self.faults is not None:
            event = Event(channel.remote_port)
            if self.faults.on_event(channel, lambda: link.send_now(event)):
                return
        link.send_now(Event(channel.remote_port))

    def channels_to(self, peer: int) -> list[EventChannel]:
        """The bound channels to `peer` (a fault run's storm sends on them)."""
        return list(self._by_peer.get(peer, ()))

    def event_source(self, channel: EventChannel) -> Link | None:
        """The link a waiter on `channel` may receive from itself (evtchn.EventChannel.wait)."""
        return self._links.link_to(channel.remote_domid)

    def close_port(self, channel: EventChannel) -> None:
        if self._ports.get(channel.port) is channel:
            self._release(channel.port)
        peers = self._by_peer.get(channel.remote_domid)
        if peers is not None:
            peers.pop(channel, None)
        if channel.remote_port is not None and not channel.closed:
            link = self._links.link_to(channel.remote_domid)
            if link is not None:
                link.send(Close(channel.remote_port, channel.port))

    # -- the peer's messages -----------------------------------------------------------------

    def on_event(self, peer: int, event: Event) -> None:
        channel = self._ports.get(event.port)
        if channel is not None and channel.remote_domid == peer and channel.remote_port is not None:
            channel.raise_event()

    def on_bind(self, link: Link, bind: Bind) -> None:
        channel = self._ports.get(bind.port)
        if (
            channel is None
            or channel.closed
            or channel.remote_domid != link.peer
            or channel.remote_port is not None
            or not isinstance(bind.binder_port, int)
        ):
            link.reply(BindReply(bind.req, _EINVAL))
            return
        channel.remote_port = bind.binder_port
        link.reply(BindReply(bind.req, 0))

    def on_close(self, peer: int, close: Close) -> None:
        channel = self._ports.get(close.port)
        if (
            channel is not None
            and channel.remote_domid == peer
            and channel.remote_port == close.closer_port
        ):
            channel.peer_closed(f"domain {peer} closed its port {close.closer_port}")

    def raise_all(self, peer: int) -> None:
        """A spurious event on every bound port to `peer` not already pending (the Dekker
        rule of docs/hypervisor.md: new shared bytes may be an index a driver decided not
        to wait for, so each re-checks its ring)."""
        for channel in self._by_peer.get(peer, ()):
            if channel.remote_port is not None and not channel.pending:
                channel.raise_event()

    def peer_gone(self, peer: int, reason: str) -> None:
        """The link to `peer` died: every port bound to it closes."""
        for channel in list(self._by_peer.get(peer, ())):
            if channel.remote_port is not None:
                channel.peer_closed(reason)
