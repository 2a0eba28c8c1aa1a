"""`LinkInjector`: the `LinkFaults` seam of domain links (xenpv.hv.faults), driven by a schedule.

Messages are opaque: the injector never looks inside one. It decides per message, from the
faults active on that direction, in this order: partition (drop, or fail the link), loss,
corrupt (a supplied corrupter, else dropped as a checksum would), duplicate, reorder (hold the
message; release it after `hold` later ones), delay + jitter, bandwidth (a token bucket over
an estimated size: `size_of(message)`, a constant by default, because typed messages have no
byte length until encoded). Random choices come from a stream per fault
(`stream(seed, "inject/<fault id>")`), so the decisions for a given sequence of messages are
reproducible; which messages a real run sends, and when, is not.

Held messages (reorder) can only leave with a later message on the same direction: the seam
is called on sends only. Stopping the fault releases them with the next message; a direction
that never sends again keeps them (a reorder at the very end of a conversation is a loss).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from xenpv import clock as clock_mod
from xenpv.faults.schedule import ScheduledFault, stream
from xenpv.hv.faults import Message, Verdict

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
                if entry.fault.param("mode") == "fail":
                    return Verdict(fail=f"{entry.fault.id}: partition of {entry.fault.target}")
                out = []
            elif kind == "link.loss":
                out = []
            elif kind == "link.corrupt":
                # With no corrupter the message is dropped, as a checksum would have caught it.
                corrupt = self.corrupter
                out = [] if corrupt is None else [corrupt(m, entry.rng) for m in out]
            elif kind == "link.duplicate":
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
        cost = float(self.size_of(message))
        before = entry.tokens
        entry.tokens -= cost
        # Earlier debt is already being waited for (the link holds its output): this message
        # adds only the part of its own cost the bucket cannot cover.
        uncovered = min(cost, max(0.0, cost - max(before, 0.0)))
        return uncovered / rate
