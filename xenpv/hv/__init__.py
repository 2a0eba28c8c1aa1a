"""The emulated hypervisor: domains, memory, grant tables, event channels, domain links.

This is the whole API drivers use (see docs/hypervisor.md for the design):

    async with open_domain(domid=1, key=key, directory=directory, endpoint="unix:/run/d1") as dom:
        page = dom.alloc_buffer(1)                          # Page: .frame .nframes .view .written()
        gref = dom.grants.grant_access(0, page.frame)       # GrantTable: grant_access / end_access
        port = await dom.alloc_unbound(0)                   # EventChannel: notify / wait / close

    # in the peer (domain 0):
        ring = await dom.map_grants(1, [gref])      # GrantMapping: .view .written(), await .unmap()
        evtchn = await dom.bind_interdomain(1, port.port)
        statuses = await dom.grant_copy([CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 512, buf)])

Link messages are typed records (`Message`, each with its `Msg` kind); fault plans see them
at `LinkFaults.on_send`.

Errors: GrantError(.status: GNTST), PeerGone (link lost: peer died or was released),
EventChannelClosed, LinkError (cannot set up a link), all HvError → XenpvError.
"""

from xenpv.abi.buffer import XEN_PAGE_SIZE, LocalBuffer, SharedBuffer
from xenpv.hv.copyengine import CopyDirection, CopyGroup, CopyOp, CopySegment
from xenpv.hv.directory import PeerDirectory, StaticDirectory
from xenpv.hv.domain import Domain, open_domain, open_registered
from xenpv.hv.errors import EventChannelClosed, GrantError, HvError, LinkError, PeerGone
from xenpv.hv.evtchn import EventChannel
from xenpv.hv.faults import LinkFaults, Verdict
from xenpv.hv.gntst import GNTST, GTF
from xenpv.hv.grant import GrantTable
from xenpv.hv.mapping import GrantMapping
from xenpv.hv.memory import PAGE_SIZES, DomainMemory, OutOfMemory, Page
from xenpv.hv.messages import Message, Msg

__all__ = [
    "GNTST",
    "GTF",
    "PAGE_SIZES",
    "XEN_PAGE_SIZE",
    "CopyDirection",
    "CopyGroup",
    "CopyOp",
    "CopySegment",
    "Domain",
    "DomainMemory",
    "EventChannel",
    "EventChannelClosed",
    "GrantError",
    "GrantMapping",
    "GrantTable",
    "HvError",
    "LinkError",
    "LinkFaults",
    "LocalBuffer",
    "Message",
    "Msg",
    "OutOfMemory",
    "Page",
    "PeerDirectory",
    "PeerGone",
    "SharedBuffer",
    "StaticDirectory",
    "Verdict",
    "open_domain",
    "open_registered",
]
