"""`LinkInjector`: the `LinkFaults` seam of domain links (xenpv.hv.faults), driven by a schedule.

Messages are opaque: the injector never looks inside one. It decides per message, from the
faults active on that direction, in this order: partition, loss, corrupt (a supplied
corrupter, else the message is lost), duplicate, reorder (hold the
message; release it after `hold` later ones), delay + jitter, bandwidth (a token bucket over
an estimated size: `size_of(message)`, a constant by default, because typed messages have no
byte length until encoded). Random choices come from a stream per fault
(`stream(seed, "inject/<fault id>")`), so the decisions for a given sequence of messages are
reproducible; which messages a real run sends, and when, is not.

A lost message breaks the link (`Verdict.fail`): a domain link is an ordered, reliable path
(a hypercall, or a connection between hosts), and the shared-memory model above it has no
way to notice one missing message: a lost event leaves both ends asleep on a ring with work
on it, a lost UPDATE leaves a replica silently stale, a lost request or reply hangs a call
for the link's call timeout. Real transports do not lose messages out of a stream either:
they retransmit (`link.delay` stands for that) or the connection fails. So `link.loss`,
`link.partition` (either mode) and an uncorruptable `link.corrupt` make the link die as a
connection would: both ends see the peer gone (PeerGone, ports closed, mappings dead), the
next operation redials, and the drivers reconnect through xenbus as after a backend
restart (docs/faults.md, "Link faults"). While a partition lasts, every redialled link dies
at its first message, so the peers stay apart until the heal.

`link.duplicate` repeats only what a peer may see twice: events (a spurious notification),
replica UPDATEs (the same bytes again) and replies (a late duplicate is ignored). A hypercall
request is carried out once, as a reliable transport's receiver discards a retransmitted
copy: a second MAP would leave a pin nobody unmaps, a second UNMAP would drop another
mapping's pin, a second BIND or CLOSE could hit a port reused since.

Held messages (reorder) can only leave with a later message on the same direction: the seam
is called on sends only. Stopping the fault releases them with the next message, which the
agent sends at once (an empty UPDATE, `holding_for`): an idle direction would keep them for
good, and a held event is then a lost one (both ends asleep).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from xenpv import clock as clock_mod
from xenpv.faults.schedule import ScheduledFault, stream
from xenpv.hv.faults import Message, Verdict
from xenpv.hv.messages import Event, Reply, Update

DEFAULT_MESSAGE_SIZE = 256  # bytes: a typical small link message, for the bandwidth fault

Corrupter = Callable[[Message, random.Random], Message]


@dataclass(slots=True)
class _Active:
    fault: ScheduledFault
    rng: random.Random
    hits: int = 0
    tokens: float = 0.0
    refilled: float = 0.0


@dataclass(slots=True)
class _Held:
    message: Message
    remaining: int  # later messages to let pass before this one


@dataclass(slots=True)
class LinkInjector:
    """Implements `LinkFaults.on_send` and `Injector` for the `link.*` kinds.

    `domids` maps domain names (as in the topology) to domids; `clock` gives seconds (the
    token bucket's time base)."""

    domids: Mapping[str, int]
    seed: int
    clock: Callable[[], float] = clock_mod.monotonic
    size_of: Callable[[Message], int] = lambda message: DEFAULT_MESSAGE_SIZE
    corrupter: Corrupter | None = None
    _active: dict[str, _Active] = field(default_factory=dict)
    _held: dict[tuple[int, int], list[_Held]] = field(default_factory=dict)

    # -- Injector ------------------------------------------------------------------------------

    def handles(self, fault: ScheduledFault) -> bool:
        return fault.kind.startswith("link.")

    def start(self, fault: ScheduledFault) -> None:
        if fault.id in self._active:
            return
        entry = _Active(fault, stream(self.seed, f"inject/{fault.id}"))
        if fault.kind == "link.bandwidth":
            entry.tokens = float(fault.param("burst"))
            entry.refilled = self.clock()
        self._active[fault.id] = entry

    def stop(self, fault: ScheduledFault) -> None:
        self._active.pop(fault.id, None)

    def holding_for(self) -> list[int]:
        """The peers some held (reordered) message is for: it leaves with the next message
        to that peer (the agent sends one when the fault stops)."""
        return sorted({dst for (_src, dst), held in self._held.items() if held})

    @property
    def active(self) -> list[ScheduledFault]:
        return [a.fault for a in self._active.values()]

    # -- LinkFaults ------------------------------------------------------------------------------

    def _ends(self, target: str) -> tuple[int, int] | None:
        text = target[len("link:") :]
        for i, ch in enumerate(text):
            if ch == "-" and text[:i] in self.domids and text[i + 1 :] in self.domids:
                return self.domids[text[:i]], self.domids[text[i + 1 :]]
        return None

    def _applies(self, fault: ScheduledFault, src: int, dst: int) -> bool:
        if fault.target.startswith("domain:"):
            domid = self.domids.get(fault.target[len("domain:") :])
            return domid in (src, dst)
        ends = self._ends(fault.target)
        if ends is None:
            return False
        if fault.kind == "link.partition" and fault.param("direction") == "one-way":
            return (src, dst) == ends
        return {src, dst} == set(ends)

    def _fires(self, entry: _Active) -> bool:
        fault = entry.fault
        if fault.count is not None and entry.hits >= fault.count:
            return False
        p = 1.0 if fault.probability is None else fault.probability
        if p < 1.0 and entry.rng.random() >= p:
            return False
        entry.hits += 1
        return True

    def on_send(self, src: int, dst: int, message: Message) -> Verdict | None:
        direction = (src, dst)
        entries = [a for a in self._active.values() if self._applies(a.fault, src, dst)]
        if not entries and direction not in self._held:
            return None
        out: list[Message] = [message]
        delay = 0.0
        hold = 0
        for entry in entries:
            kind = entry.fault.kind
            if kind == "link.bandwidth":
                delay += self._bandwidth(entry, message)
                continue
            if not out or not self._fires(entry):
                continue
            if kind == "link.partition":
                return Verdict(fail=f"{entry.fault.id}: partition of {entry.fault.target}")
            if kind == "link.loss":
                return Verdict(fail=f"{entry.fault.id}: a message lost on {entry.fault.target}")
            if kind == "link.corrupt":
                corrupt = self.corrupter
                if corrupt is None:  # caught by a checksum: lost, so the link fails
                    return Verdict(
                        fail=f"{entry.fault.id}: a corrupt message on {entry.fault.target}"
                    )
                out = [corrupt(m, entry.rng) for m in out]
            elif kind == "link.duplicate":
                if _repeatable(message):
                    out = out + out
            elif kind == "link.reorder":
                hold = int(entry.fault.param("hold"))
                out = []
            elif kind == "link.delay":
                jitter = float(entry.fault.param("jitter"))
                delay += float(entry.fault.param("delay"))
                if jitter > 0:
                    delay += entry.rng.uniform(0.0, jitter)
        out += self._release(direction, sent=bool(out))
        if hold:
            self._held.setdefault(direction, []).append(_Held(message, hold))
        if out == [message] and delay == 0.0:
            return None
        return Verdict(send=out, delay=delay)

    def _release(self, direction: tuple[int, int], *, sent: bool) -> list[Message]:
        """Held messages leave once `hold` later messages went, or with the next message
        of any kind once no reorder fault is active."""
        held = self._held.get(direction)
        if not held:
            return []
        reordering = any(a.fault.kind == "link.reorder" for a in self._active.values())
        released: list[Message] = []
        keep: list[_Held] = []
        for item in held:
            if sent:
                item.remaining -= 1
            if item.remaining <= 0 or not reordering:
                released.append(item.message)
            else:
                keep.append(item)
        if keep:
            self._held[direction] = keep
        else:
            del self._held[direction]
        return released

    def _bandwidth(self, entry: _Active, message: Message) -> float:
        rate = float(entry.fault.param("rate"))
        burst = float(entry.fault.param("burst"))
        now = self.clock()
        entry.tokens = min(burst, entry.tokens + (now - entry.refilled) * rate)
        entry.refilled = now
        entry.tokens -= float(self.size_of(message))
        # The message leaves once the bucket has paid for it, debt of earlier ones included
        # (a link delay counts from now: Verdict).
        return max(0.0, -entry.tokens) / rate


def _repeatable(message: Message) -> bool:
    """A message whose second copy changes nothing (see the module docstring)."""
    return type(message) in (Event, Update) or isinstance(message, Reply)
