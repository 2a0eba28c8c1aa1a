"""Shrinking a failing seed's schedule to a small plan that fails the same way.

`xenpv faults shrink PLAN --seed N` (docs/faults.md, "Simulation") starts from the schedule
the seed produced, pins every fault at its drawn target, offset, window and parameters in an
explicit plan (`pinned_plan`: one `[[fault]]` per occurrence, no ranges, so nothing is drawn
again), and re-runs candidates, keeping a change only if the same checker still fails:

1. drop faults (`ddmin`, Zeller's delta debugging, over the list of faults);
2. shorten each remaining fault's window (halving, start kept);
3. cut the workload: drop whole workloads (`ddmin` again), end the run as early as the plan
   allows (the last heal plus the quiet tail), then one thread and half the rate each.

Everything here is synchronous and IO-free except through `attempt`, the caller's function
that runs a candidate plan and says which checkers failed: the sim wiring lives in the CLI
(xenpv/commands/faults.py) and the tests can drive the shrinker with a fake.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from xenpv.errors import XenpvError
from xenpv.faults.plan import Plan, WorkloadSpec, loads
from xenpv.faults.schedule import Schedule, ScheduledFault

T = TypeVar("T")

MIN_WINDOW = 0.01  # seconds: windows are not shortened below this
MIN_RATE = 1.0  # operations per second per thread


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal sublist of `items` that still `fails` (Zeller's ddmin): removing any one
    element of the result makes `fails` false. `fails(list(items))` is assumed true and is
    not asked; the empty list is tried first (a failure that needs none of them)."""
    current = list(items)
    if not current:
        return current
    if fails([]):
        return []
    n = 2
    while len(current) >= 2:
        size = math.ceil(len(current) / n)
        chunks = [current[i : i + size] for i in range(0, len(current), size)]
        reduced = False
        for i, chunk in enumerate(chunks):
            if len(chunks) > 2 and fails(chunk):  # a subset fails (with 2 chunks: below)
                current, n, reduced = chunk, 2, True
                break
            complement = [x for j, c in enumerate(chunks) if j != i for x in c]
            if fails(complement):
                current, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if n >= len(current):
                break
            n = min(n * 2, len(current))
    return current


# -- the pinned plan --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """What a shrink step changes: the faults, the workloads and the run's length."""

    faults: tuple[ScheduledFault, ...]
    workloads: tuple[WorkloadSpec, ...]
    duration: float


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def pinned_plan(plan: Plan, schedule: Schedule, candidate: Candidate, topology: str) -> str:
    """The TOML text of a plan that injects exactly `candidate.faults` (each at its drawn
    target, offset, window and parameters) under `candidate.workloads`, for
    `candidate.duration` seconds; `topology` is what its `run.topology` says. The unaffected
    guests are the schedule's, so dropping faults never adds guests that must see no errors."""
    lines = [
        f"name = {_toml_value(plan.name + '-shrunk')}",
        f"description = {_toml_value(f'{plan.name}, seed {schedule.seed}, shrunk')}",
        "",
        "[run]",
        f"seed = {schedule.seed}",
        f"duration = {_toml_value(float(candidate.duration))}",
        f"quiet = {_toml_value(float(plan.run.quiet))}",
        f"topology = {_toml_value(topology)}",
    ]
    for w in candidate.workloads:
        lines += [
            "",
            "[[workload]]",
            f"kind = {_toml_value(w.kind)}",
            f"targets = {_toml_value(list(w.targets))}",
            f"rate = {_toml_value(float(w.rate))}",
            f"threads = {w.threads}",
        ]
        if w.kind == "block":
            lines.append(f"flush_every = {w.flush_every}")
        lines += [f"blocks = {w.blocks}", f"size = {w.size}"]
    for f in candidate.faults:
        lines += [
            "",
            "[[fault]]",
            f"kind = {_toml_value(f.kind)}",
            f"target = {_toml_value(f.target)}",
            f"at = {_toml_value(float(f.start))}",
            f"duration = {_toml_value(round(f.stop - f.start, 6))}",
        ]
        if f.probability is not None:
            lines.append(f"probability = {_toml_value(float(f.probability))}")
        if f.count is not None:
            lines.append(f"count = {f.count}")
        lines += [f"{name} = {_toml_value(value)}" for name, value in f.params]
    lines += [
        "",
        "[checks]",
        f"liveness = {_toml_value(float(schedule.liveness))}",
        f"unaffected = {_toml_value(list(schedule.unaffected))}",
    ]
    return "\n".join(lines) + "\n"


# -- the shrinker ------------------------------------------------------------------------------

# (plan to run) -> the names of the checkers that failed it (empty: it passed)
Attempt = Callable[[Plan], frozenset[str]]


@dataclass
class ShrinkResult:
    checker: str
    before: Candidate
    after: Candidate
    text: str  # the smallest failing plan's TOML
    attempts: int


class ShrinkError(XenpvError):
    pass


@dataclass
class Shrinker:
    """Shrinks `schedule` (the failing seed's, of `plan`) keeping `checker` failing."""

    plan: Plan
    schedule: Schedule
    checker: str
    attempt: Attempt
    topology: str  # what the candidates' run.topology says (an absolute path, or "demo")
    attempts: int = 0
    log: Callable[[str], None] = lambda line: None

    def text(self, candidate: Candidate) -> str:
        return pinned_plan(self.plan, self.schedule, candidate, self.topology)

    def fails(self, candidate: Candidate) -> bool:
        self.attempts += 1
        failed = self.attempt(loads(self.text(candidate), f"{self.plan.name}-shrunk"))
        return self.checker in failed

    def shortest_duration(self, candidate: Candidate) -> float:
        last = max((f.stop for f in candidate.faults), default=0.0)
        return round(max(last + self.plan.run.quiet + MIN_WINDOW, self.plan.run.quiet * 1.5), 6)

    def run(self) -> ShrinkResult:
        before = Candidate(self.schedule.faults, self.plan.workloads, self.plan.run.duration)
        if not self.fails(before):
            raise ShrinkError(
                f"the seed's faults pinned in a plan do not fail {self.checker} (a fault that "
                "draws per message may draw differently under another fault id)"
            )
        current = before
        # 1. drop faults
        faults = ddmin(
            list(current.faults),
            lambda fs: self.fails(dataclasses.replace(current, faults=tuple(fs))),
        )
        current = dataclasses.replace(current, faults=tuple(faults))
        self.log(f"faults: {len(before.faults)} -> {len(current.faults)}")
        # 2. shorten windows
        for i in range(len(current.faults)):
            while True:
                f = current.faults[i]
                window = round((f.stop - f.start) / 2, 6)
                if window < MIN_WINDOW:
                    break
                shorter = dataclasses.replace(f, stop=round(f.start + window, 6))
                trial = dataclasses.replace(
                    current, faults=(*current.faults[:i], shorter, *current.faults[i + 1 :])
                )
                if not self.fails(trial):
                    break
                current = trial
        # 3. cut the workload
        if len(current.workloads) > 1:
            kept = ddmin(
                list(current.workloads),
                lambda ws: (
                    bool(ws) and self.fails(dataclasses.replace(current, workloads=tuple(ws)))
                ),
            )
            current = dataclasses.replace(current, workloads=tuple(kept))
        shortest = self.shortest_duration(current)
        if shortest < current.duration:
            trial = dataclasses.replace(current, duration=shortest)
            if self.fails(trial):
                current = trial
        for i in range(len(current.workloads)):
            for smaller in (_one_thread, _half_rate):
                w = current.workloads[i]
                if smaller(w) == w:
                    continue
                trial = dataclasses.replace(
                    current,
                    workloads=(*current.workloads[:i], smaller(w), *current.workloads[i + 1 :]),
                )
                if self.fails(trial):
                    current = trial
        return ShrinkResult(self.checker, before, current, self.text(current), self.attempts)


def _one_thread(w: WorkloadSpec) -> WorkloadSpec:
    return dataclasses.replace(w, threads=1)


def _half_rate(w: WorkloadSpec) -> WorkloadSpec:
    return dataclasses.replace(w, rate=max(MIN_RATE, w.rate / 2))


def relocated(text: str, topology: str) -> str:
    """`text` (a pinned plan) with its `run.topology` line saying `topology` instead."""
    out = []
    in_run = False
    for line in text.splitlines():
        if line.startswith("["):
            in_run = line == "[run]"
        if in_run and line.startswith("topology = "):
            line = f"topology = {_toml_value(topology)}"
        out.append(line)
    return "\n".join(out) + "\n"


def topology_source(plan: Plan) -> Path | None:
    """The plan's topology file, resolved (None for the demo topology)."""
    if plan.run.topology == "demo":
        return None
    path = Path(plan.run.topology)
    if not path.is_absolute() and plan.base_dir is not None:
        path = plan.base_dir / path
    return path.resolve()
