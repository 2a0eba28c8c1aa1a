"""The fault agent inside xenstored: its control node drives the server's `XsFaults` seam.

`xenpv xenstored` runs `serve_control(config, open_client)`: a dom0 client of its own socket
(a simulated xenstored: of its in-memory connections) that watches
`/tool/xenpv/faults/xenstored` (`xenpv.faults.control`). While the node lists faults,
`config.faults` is an `XsFaultSet`; when it lists none (or is removed) the seam is None again,
so a xenstored outside a fault run pays nothing.

Requests go through the server's `XsFaults` seam:
- `xenstore.commit-eagain`: a transaction commit (TRANSACTION_END "T") of the target domain
  is answered EAGAIN (one in `one_in`, or per `probability` / `count`): clients must retry;
- `xenstore.conn-reset`: the target domain's next request closes its connection (once per
  window); the client reconnects and re-registers its watches.
Watch events xenstored queues go through its `XsEventFaults` seam (`config.event_faults`,
None unless a watch-event fault is active), per connection of the target domain (every
domain but dom0 for the `xenstored` target):
- `xenstore.watch-delay`: each event is held `delay` seconds, then queued;
- `xenstore.watch-duplicate`: each event is queued twice;
- `xenstore.watch-drop`: events are not sent (per `probability` / `count`);
- `xenstore.watch-flood`: each event is fanned out into as many copies as a token bucket
  filled at `rate` events per second allows (at most a second's worth at once): the domain
  is flooded at about `rate` while it causes events at all (XSA-349). xenstored's bound on
  queued events per connection holds for every copy, so the flood costs bounded memory,
  drops only that domain's events beyond the bound and never delays another domain.
Requests and events of dom0 (the toolstack, this agent) are never faulted: the control
plane must keep working during a run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import structlog
import trio

from xenpv.clock import monotonic
from xenpv.faults.control import XENSTORED, Control, Hits, control_path, param
from xenpv.faults.schedule import ScheduledFault, stream
from xenpv.xenstore.client import XenstoreClient, XenstoreConnectionError, connect
from xenpv.xenstore.server import EventVerdict, ServerConfig, XsVerdict
from xenpv.xenstore.wire import Message, XsError, XsType

log = structlog.get_logger()

REQUEST_KINDS = frozenset({"xenstore.commit-eagain", "xenstore.conn-reset"})
EVENT_KINDS = frozenset(
    {
        "xenstore.watch-delay",
        "xenstore.watch-duplicate",
        "xenstore.watch-drop",
        "xenstore.watch-flood",
    }
)
KINDS = REQUEST_KINDS | EVENT_KINDS
FLOOD_BURST = 1.0  # seconds of a flood's rate one event may be fanned out into


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
    clock: Callable[[], float] = monotonic  # the simulation's seam (xenpv/clock.py)
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # flood: tokens, at

    @property
    def has_request_faults(self) -> bool:
        return any(h.fault.kind in REQUEST_KINDS for h, _ in self.active.values())

    @property
    def has_event_faults(self) -> bool:
        return any(h.fault.kind in EVENT_KINDS for h, _ in self.active.values())

    def start(self, fault: ScheduledFault) -> None:
        if fault.kind in KINDS and fault.id not in self.active:
            hits = Hits(fault, stream(self.seed, f"inject/{fault.id}"))
            self.active[fault.id] = (hits, target_domid(fault, self.domids))

    def stop(self, fault_id: str) -> None:
        self.active.pop(fault_id, None)
        self.buckets.pop(fault_id, None)

    def on_event(self, domid: int, msg: Message) -> EventVerdict | None:
        if domid == 0:
            return None
        verdict: EventVerdict | None = None
        for hits, target in self.active.values():
            kind = hits.fault.kind
            if kind not in EVENT_KINDS or (target is not None and domid != target):
                continue
            if kind == "xenstore.watch-flood":
                copies = self._flood_copies(hits.fault)
                if copies > 1:
                    verdict = verdict or EventVerdict()
                    verdict.copies = max(verdict.copies, copies)
                continue
            if not hits.fires():
                continue
            verdict = verdict or EventVerdict()
            if kind == "xenstore.watch-drop":
                verdict.drop = True
            elif kind == "xenstore.watch-duplicate":
                verdict.copies = max(verdict.copies, 2)
            elif kind == "xenstore.watch-delay":
                verdict.delay = max(verdict.delay, float(param(hits.fault, "delay", 0.05)))
        return verdict

    def _flood_copies(self, fault: ScheduledFault) -> int:
        """1 + the whole tokens a bucket filled at the flood's rate holds now (then spent)."""
        rate = float(param(fault, "rate", 5000.0))
        now = self.clock()
        tokens, at = self.buckets.get(fault.id, (0.0, now))
        tokens = min(rate * FLOOD_BURST, tokens + (now - at) * rate)
        spent = int(tokens)
        self.buckets[fault.id] = (tokens - spent, now)
        return 1 + spent

    def on_request(self, domid: int, msg: Message) -> XsVerdict | None:
        if domid == 0:
            return None
        for hits, target in self.active.values():
            if target is not None and domid != target:
                continue
            kind = hits.fault.kind
            if kind in EVENT_KINDS:
                continue
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
        config.event_faults = None
        return None
    faults = current or XsFaultSet(control.run.seed, dict(control.run.domids))
    wanted = {f.id: f for f in control.faults if f.kind in KINDS}
    for fault_id in [i for i in faults.active if i not in wanted]:
        faults.stop(fault_id)
    for fault in wanted.values():
        faults.start(fault)
    # Each seam is set only while a fault of its kind is active: otherwise None, free.
    config.faults = faults if faults.has_request_faults else None
    config.event_faults = faults if faults.has_event_faults else None
    return faults


def unix_client(socket_path: str) -> Callable[[], AbstractAsyncContextManager[XenstoreClient]]:
    """`serve_control`'s client of a xenstored listening on `socket_path`."""
    return lambda: connect(f"unix:{socket_path}")


async def serve_control(
    config: ServerConfig, open_client: Callable[[], AbstractAsyncContextManager[XenstoreClient]]
) -> None:
    """Follow the control node for as long as xenstored runs (`open_client()`: a dom0
    connection to this xenstored)."""
    path = control_path(XENSTORED)
    current: XsFaultSet | None = None
    try:
        async with open_client() as xs, xs.watch(path) as events:
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
        config.event_faults = None
