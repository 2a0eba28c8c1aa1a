"""From (plan, seed, topology) to a concrete schedule: which fault hits which target when.

Every random choice comes from a stream split off the root seed by name
(`stream(seed, "fault[2]/target")`), so an extra draw in one stream never shifts another:
adding a fault to a plan leaves the other faults' targets, windows and parameters as they were.
The schedule is plain data; `schedule_hash` is the SHA-256 of its canonical JSON, so two runs
with the same plan and seed can prove they injected the same thing.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from xenpv.faults.catalogue import CATALOGUE, Scalar
from xenpv.faults.plan import Draw, FaultSpec, Plan, Value, check_targets, resolve_topology
from xenpv.faults.records import JsonRecord, by_id, record_from_json, record_json
from xenpv.faults.targets import Targets
from xenpv.toolstack.topology import Topology

SCHEDULE_FORMAT = 1


def stream(seed: int, name: str) -> random.Random:
    """An independent random stream for one subsystem, derived from the root seed."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def canonical_json(value: object) -> str:
    """The one JSON text of a value: sorted keys, no spaces, floats as Python writes them."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    """One occurrence of a fault: `id` is `f{plan index}.{occurrence}`, e.g. `f2.0`."""

    id: str
    spec: int  # index of the plan's [[fault]]
    kind: str
    target: str  # a concrete target
    start: float  # seconds from the start of the run
    stop: float
    probability: float | None
    count: int | None
    params: tuple[tuple[str, Scalar], ...]

    def param(self, name: str) -> Scalar:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return record_json(self, omit=("params",)) | {"params": dict(self.params)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ScheduledFault:
        params = tuple(sorted(dict(raw.get("params") or {}).items()))
        return record_from_json(cls, raw, params=params)


@dataclass(frozen=True, slots=True)
class ScheduledWorkload(JsonRecord):
    index: int
    kind: str
    targets: tuple[str, ...]  # concrete devices (block, net) or domains (xenstore)
    rate: float
    threads: int
    flush_every: int
    blocks: int
    size: int


@dataclass(frozen=True, slots=True)
class Schedule:
    plan: str
    seed: int
    duration: float
    quiet: float
    liveness: float
    unaffected: tuple[str, ...]
    topology: Targets
    workloads: tuple[ScheduledWorkload, ...]
    faults: tuple[ScheduledFault, ...]
    source: str = ""  # the plan file or built-in name (not hashed: moving a file changes nothing)

    @property
    def last_heal(self) -> float:
        return max((f.stop for f in self.faults), default=0.0)

    def events(self) -> list[tuple[float, str, ScheduledFault]]:
        """(offset, "start" | "stop", fault) in time order; at equal offsets stops come
        first, so a fault that ends when another begins never overlaps it."""
        out = [(f.start, "start", f) for f in self.faults]
        out += [(f.stop, "stop", f) for f in self.faults]
        out.sort(key=lambda e: (e[0], e[1] == "start", e[2].id))
        return out

    def fault(self, fault_id: str) -> ScheduledFault:
        return by_id(self.faults, fault_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "plan": self.plan,
            "seed": self.seed,
            "duration": self.duration,
            "quiet": self.quiet,
            "liveness": self.liveness,
            "unaffected": list(self.unaffected),
            "topology": self.topology.to_json(),
            "workloads": [w.to_json() for w in self.workloads],
            "faults": [f.to_json() for f in self.faults],
            "source": self.source,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Schedule:
        if raw.get("format") != SCHEDULE_FORMAT:
            raise ValueError(f"schedule format {raw.get('format')!r}, expected {SCHEDULE_FORMAT}")
        return record_from_json(cls, raw)

    def canonical(self) -> str:
        """The canonical JSON the hash covers (everything but `source`)."""
        body = self.to_json()
        del body["source"]
        return canonical_json(body)

    @property
    def hash(self) -> str:
        return schedule_hash(self)


def schedule_hash(schedule: Schedule) -> str:
    return hashlib.sha256(schedule.canonical().encode()).hexdigest()


def _draw(value: Value, rng: random.Random) -> Scalar:
    if not isinstance(value, Draw):
        return value
    if value.choices:
        return rng.choice(value.choices)
    assert value.lo is not None and value.hi is not None
    if value.integer:
        return rng.randint(int(value.lo), int(value.hi))
    # Rounded so the canonical JSON does not depend on float printing beyond microseconds.
    return round(rng.uniform(value.lo, value.hi), 6)


def _number(value: Scalar) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool)
    return float(value)


def _occurrences(spec: FaultSpec, plan: Plan, seed: int, targets: Targets) -> list[ScheduledFault]:
    target_rng = stream(seed, f"fault[{spec.index}]/target")
    window_rng = stream(seed, f"fault[{spec.index}]/window")
    param_rng = stream(seed, f"fault[{spec.index}]/params")
    candidates = targets.candidates(spec.target)
    phase = plan.run.fault_phase
    out: list[ScheduledFault] = []
    start = _number(_draw(spec.at, window_rng))
    n = 0
    while True:
        duration = _number(_draw(spec.duration, window_rng))
        if start + duration > phase + 1e-9:
            break
        target = candidates[0] if len(candidates) == 1 else target_rng.choice(candidates)
        params = tuple(sorted((k, _draw(v, param_rng)) for k, v in spec.params))
        out.append(
            ScheduledFault(
                f"f{spec.index}.{n}",
                spec.index,
                spec.kind,
                target,
                round(start, 6),
                round(start + duration, 6),
                spec.probability,
                spec.count,
                params,
            )
        )
        n += 1
        if spec.every is None:
            break
        start += spec.every
    return out


def _workload_targets(kind: str, selectors: tuple[str, ...], targets: Targets) -> tuple[str, ...]:
    """A workload runs on every target its selectors may mean (an `any-` means all of them
    here): domains for xenstore, that kind's devices for block (vbd) and net (vif)."""
    cls = {"block": "vbd", "net": "vif"}.get(kind)
    out: list[str] = []
    for s in selectors:
        chosen = (
            [f"domain:{n}" for n, r in targets.roles.items() if r == "guest"]
            if s == "all"
            else targets.candidates(s)
        )
        for c in chosen:
            if cls is None:
                out.append(c)
            elif c.startswith("domain:"):
                guest = c[len("domain:") :]
                out += [d.id for d in targets.devices if d.cls == cls and d.guest == guest]
            elif c.startswith("device:") and targets.device(c).cls == cls:
                out.append(c)
    return tuple(dict.fromkeys(out))


def build(plan: Plan, seed: int | None = None, topology: Topology | None = None) -> Schedule:
    """The concrete schedule of `plan` for `seed` (default: the plan's) on `topology`
    (default: the plan's `run.topology`)."""
    seed = plan.run.seed if seed is None else seed
    targets = Targets.of(resolve_topology(plan) if topology is None else topology)
    check_targets(plan, targets)
    faults: list[ScheduledFault] = []
    for spec in plan.faults:
        faults += _occurrences(spec, plan, seed, targets)
    faults.sort(key=lambda f: (f.start, f.spec, f.id))
    workloads = tuple(
        ScheduledWorkload(
            w.index,
            w.kind,
            _workload_targets(w.kind, w.targets, targets),
            w.rate,
            w.threads,
            w.flush_every,
            w.blocks,
            w.size,
        )
        for w in plan.workloads
    )
    if plan.checks.unaffected is not None:
        unaffected = plan.checks.unaffected
    else:  # every guest that no fault may disturb
        unaffected = tuple(
            g
            for g, role in targets.roles.items()
            if role == "guest" and not any(targets.touches_guest(f.target, g) for f in faults)
        )
    assert all(f.kind in CATALOGUE for f in faults)
    return Schedule(
        plan.name,
        seed,
        plan.run.duration,
        plan.run.quiet,
        plan.checks.liveness,
        unaffected,
        targets,
        workloads,
        tuple(faults),
        plan.source,
    )
