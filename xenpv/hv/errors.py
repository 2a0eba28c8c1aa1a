"""Errors of the emulated hypervisor, each mapping to what Xen would report."""

from __future__ import annotations

from xenpv.errors import XenpvError
from xenpv.hv.gntst import GNTST


class HvError(XenpvError):
    """Base class of every hypervisor error."""


class GrantError(HvError):
    """A grant operation failed with a GNTST status (grant_table.h)."""

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = GNTST(status)
        text = f"{self.status.name} ({int(self.status)})"
        super().__init__(f"{text}: {detail}" if detail else text)


class PeerGone(HvError):
    """The link to a peer domain died (EOF, process killed, released) or could not be set up."""


class LinkError(HvError):
    """A domain link could not be established (unreachable endpoint, failed proof of domid)."""


class EventChannelClosed(HvError):
    """The event channel was closed, locally or by the peer (or the peer died)."""
