"""The fault seam of domain links: one interposition point for every message.

Every message a domain sends on a link (events, binds, grant map/unmap/copy requests and
replies, replica updates) passes `LinkFaults.on_send` before it is encoded. A message is one of
the typed records of messages.py (`Message`); each has a `kind` (its `Msg` type). A fault plan
implements it (docs/architecture.md, "Seams"; `xenpv.faults.link.LinkInjector`); `None`
(the default) costs nothing. Grant operations that reach another domain are link messages, so
they pass here too; a grant operation that stays inside one domain (grant_access, end_access)
involves no link and cannot fail in transit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from xenpv.hv.messages import Message

__all__ = ["LinkFaults", "Message", "Verdict"]


@dataclass(slots=True)
class Verdict:
    """What to do with one outgoing message.

    `send`: the messages to transmit instead (`[]` drops, `[m, m]` duplicates, a changed copy
    corrupts, holding a message and releasing it with a later one reorders); `delay`: seconds
    from now before they leave (later messages wait too: order is kept; messages delayed
    one after the other are in flight together, as on a link with latency);
    `fail`: a reason to break the link, as if the peer had died.
    """

    send: Sequence[Message] = field(default_factory=list)
    delay: float = 0.0
    fail: str | None = None


class LinkFaults(Protocol):
    def on_send(self, src: int, dst: int, message: Message) -> Verdict | None:
        """Decide the fate of `message` from domain `src` to `dst`; None sends it unchanged."""
        ...
