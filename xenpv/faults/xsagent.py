"""The fault agent inside xenstored: its control node drives the server's `XsFaults` seam.

`xenpv xenstored` runs `serve_control(config, socket)`: a dom0 client of its own socket that
watches `/tool/xenpv/faults/xenstored` (`xenpv.faults.control`). While the node lists faults,
`config.faults` is an `XsFaultSet`; when it lists none (or is removed) the seam is None again,
so a xenstored outside a fault run pays nothing.

What the seam sees is requests, so the kinds injected here are the ones a request carries:
- `xenstore.commit-eagain`: a transaction commit (TRANSACTION_END "T") of the target domain
  is answered EAGAIN (one in `one_in`, or per `probability` / `count`): clients must retry;
- `xenstore.conn-reset`: the target domain's next request closes its connection (once per
  window); the client reconnects and re-registers its watches.
Watch-event kinds (`watch-delay`, `-duplicate`, `-drop`, `-flood`) need a seam on the events
xenstored sends, which it does not have yet. Requests of dom0 (the toolstack, this agent) are
never faulted: the control plane must keep working during a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import trio

from xenpv.faults.control import XENSTORED, Control, Hits, control_path
from xenpv.faults.schedule import ScheduledFault, stream
from xenpv.xenstore.client import XenstoreConnectionError, connect
from xenpv.xenstore.server import ServerConfig, XsVerdict
from xenpv.xenstore.wire import Message, XsError, XsType

log = structlog.get_logger()

KINDS = frozenset({"xenstore.commit-eagain", "xenstore.conn-reset"})


def target_domid(fault: ScheduledFault, domids: dict[str, int]) -> int | None:
    """The domain a fault is aimed at; None: every domain but dom0 (`xenstored` target)."""
    if fault.target.startswith("domain:"):
        return domids.get(fault.target[len("domain:") :], -1)
    return None


@dataclass
class XsFaultSet:
    """`XsFaults` for the active xenstore faults."""

    seed: int
    domids: dict[str, int]
    active: dict[str, tuple[Hits, int | None]] = field(default_factory=dict)

    def start(self, fault: ScheduledFault) -> None:
        if fault.kind in KINDS and fault.id not in self.active:
            hits = Hits(fault, stream(self.seed, f"inject/{fault.id}"))
            self.active[fault.id] = (hits, target_domid(fault, self.domids))

    def stop(self, fault_id: str) -> None:
        self.active.pop(fault_id, None)

    def on_request(self, domid: int, msg: Message) -> XsVerdict | None:
        if domid == 0:
            return None
        for hits, target in self.active.values():
            if target is not None and domid != target:
                continue
            kind = hits.fault.kind
            if kind == "xenstore.conn-reset":
                if hits.hits == 0:
                    hits.hits += 1
                    return XsVerdict(fail=f"injected fault {hits.fault.id}")
            elif (
                kind == "xenstore.commit-eagain"
                and msg.type == XsType.XS_TRANSACTION_END
                and msg.payload.startswith(b"T")
                and hits.fires()
            ):
                return XsVerdict(error="EAGAIN")
        return None


def apply(config: ServerConfig, current: XsFaultSet | None, control: Control) -> XsFaultSet | None:
    """Make the server's seam match `control`; returns the fault set now in use."""
    if control.run is None or not control.faults:
        config.faults = None
        return None
    faults = current or XsFaultSet(control.run.seed, dict(control.run.domids))
    wanted = {f.id: f for f in control.faults if f.kind in KINDS}
    for fault_id in [i for i in faults.active if i not in wanted]:
        faults.stop(fault_id)
    for fault in wanted.values():
        faults.start(fault)
    config.faults = faults if faults.active else None
    return faults


async def serve_control(config: ServerConfig, socket_path: str) -> None:
    """Follow the control node for as long as xenstored runs."""
    path = control_path(XENSTORED)
    current: XsFaultSet | None = None
    try:
        async with connect(f"unix:{socket_path}") as xs, xs.watch(path) as events:
            async for _event in events:
                try:
                    raw = await xs.try_read(path)
                except (XsError, XenstoreConnectionError) as exc:
                    log.warning("cannot read the fault control node", error=str(exc))
                    continue
                current = apply(config, current, Control.decode(raw))
                if current is not None:
                    log.info("xenstore faults active", faults=sorted(current.active))
    except (XenstoreConnectionError, OSError, trio.BrokenResourceError) as exc:
        log.warning("fault control stopped", error=str(exc))
    finally:
        config.faults = None
