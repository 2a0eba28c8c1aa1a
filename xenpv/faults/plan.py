"""Fault plans (TOML): what runs, which faults hit what and when, and what is checked.

```toml
name = "partition"                 # optional; defaults to the file's stem
description = "cut a guest off its backend and heal"

[run]
seed = 1                           # the root seed (`--seed` overrides it)
duration = 40.0                    # seconds, faults included
quiet = 10.0                       # the quiet tail: no faults, liveness must be reached
topology = "demo"                  # "demo" (xenpv's default topology) or a topology file path

[[workload]]
kind = "block"                     # block | net | xenstore
targets = ["all"]                  # selectors (see xenpv.faults.targets); "all": every device
rate = 200.0                       # operations per second per thread, 0 = as fast as possible
threads = 2
flush_every = 16                   # block: a flush after every N writes, 0 = never
blocks = 64                        # block: distinct blocks written; xenstore: distinct keys
size = 4096                        # bytes per block write or per frame

[[fault]]
kind = "link.partition"            # family.name from the catalogue (`xenpv faults list`)
target = "any-link"                # a selector; `any-` picks one with the seed
at = 5.0                           # window start (seconds); or a range [lo, hi] drawn per seed
duration = 5.0                     # window length (or a range)
every = 15.0                       # optional: repeat the window every N seconds
probability = 0.5                  # optional: the chance each message/op is hit (default 1)
# count = 3                        # instead of probability: at most N hits per window
direction = "both"                 # the kind's own parameters (a value, or a range to draw)

[checks]
liveness = 10.0                    # seconds after the last heal for every device to recover
unaffected = ["guest64k"]          # guests that must see no errors (default: untargeted ones)
```

Validation is strict and every error names the field, e.g. `fault[2].target: no domain named
'zz'`. Syntax is checked when the file is loaded; targets when a topology is known
(`resolve_topology`, `check_targets`).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from xenpv.faults.catalogue import CATALOGUE, FaultKind, Param, Scalar, TargetKind
from xenpv.faults.targets import SelectorError, Targets, selector_kind
from xenpv.toolstack.topology import TomlTable, Topology, TopologyError, default_topology
from xenpv.toolstack.topology import load as load_topology

WorkloadKind = Literal["block", "net", "xenstore"]
WORKLOAD_KINDS: tuple[WorkloadKind, ...] = ("block", "net", "xenstore")
MAX_SECONDS = 24 * 3600.0
MAX_SEED = (1 << 63) - 1


class PlanError(TopologyError):
    """A fault plan is malformed; the message names the field and the reason."""


# A numeric parameter given as [lo, hi] is drawn per seed; a string one given as a list of
# choices is drawn among them.
@dataclass(frozen=True, slots=True)
class Draw:
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Scalar, ...] = ()
    integer: bool = False

    def to_json(self) -> object:
        if self.choices:
            return list(self.choices)
        return [self.lo, self.hi]


Value = Scalar | Draw


@dataclass(frozen=True, slots=True)
class RunSpec:
    seed: int = 1
    duration: float = 30.0
    quiet: float = 10.0
    topology: str = "demo"

    @property
    def fault_phase(self) -> float:
        """Faults must heal by this offset; the rest of the run is the quiet tail."""
        return self.duration - self.quiet


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    index: int
    kind: WorkloadKind
    targets: tuple[str, ...]
    rate: float
    threads: int
    flush_every: int
    blocks: int
    size: int


@dataclass(frozen=True, slots=True)
class FaultSpec:
    index: int
    kind: str  # catalogue id
    target: str  # a selector
    at: Value
    duration: Value
    every: float | None
    probability: float | None
    count: int | None
    params: tuple[tuple[str, Value], ...]  # every parameter of the kind, defaults filled in

    @property
    def where(self) -> str:
        return f"fault[{self.index}]"


@dataclass(frozen=True, slots=True)
class ChecksSpec:
    liveness: float = 10.0
    unaffected: tuple[str, ...] | None = None  # None: every guest no fault touches


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    description: str
    run: RunSpec
    workloads: tuple[WorkloadSpec, ...]
    faults: tuple[FaultSpec, ...]
    checks: ChecksSpec
    base_dir: Path | None = None  # where a relative topology path is looked up
    source: str = ""  # how to name it again: a file path, or a built-in plan's name


class _Table(TomlTable):
    """A plan table's typed reads; its errors are `PlanError`s."""

    error = PlanError

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.get(key, default, required=required)
        if not isinstance(value, str):
            raise PlanError(self.at(key), f"expected a string, got {value!r}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        return _integer(self.get(key, default), self.at(key), lo, hi)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        return _number(self.get(key, default), self.at(key), lo, hi)

    def strings(self, key: str, default: Sequence[str]) -> tuple[str, ...]:
        value = self.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PlanError(self.at(key), f"expected an array of strings, got {value!r}")
        return tuple(value)


def _integer(value: object, where: str, lo: float, hi: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(where, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise PlanError(where, f"must be between {lo:g} and {hi:g}, got {value}")
    return value


def _number(value: object, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(where, f"expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not lo <= number <= hi:
        raise PlanError(where, f"must be between {lo:g} and {hi:g}, got {value}")
    return number


def _value(raw: object, where: str, lo: float, hi: float, *, integer: bool = False) -> Value:
    """A number, or `[lo, hi]` to draw one per seed."""
    parse = _integer if integer else _number
    if isinstance(raw, list):
        if len(raw) != 2:
            raise PlanError(where, f"a range is [lo, hi], got {raw!r}")
        a, b = (parse(v, where, lo, hi) for v in raw)
        if a > b:
            raise PlanError(where, f"range [{a:g}, {b:g}] is empty")
        return Draw(float(a), float(b), integer=integer)
    return parse(raw, where, lo, hi)


def _param_value(param: Param, raw: object, where: str) -> Value:
    if param.type is bool:
        if not isinstance(raw, bool):
            raise PlanError(where, f"expected true or false, got {raw!r}")
        return raw
    if param.type is str:
        options = raw if isinstance(raw, list) else [raw]
        for option in options:
            if not isinstance(option, str):
                raise PlanError(where, f"expected a string, got {option!r}")
            if param.choices and option not in param.choices:
                listed = ", ".join(repr(c) for c in param.choices)
                raise PlanError(where, f"must be one of {listed}, got {option!r}")
        if isinstance(raw, list):
            if not raw:
                raise PlanError(where, "an empty list of choices")
            return Draw(choices=tuple(raw))
        return str(raw)
    lo = -math.inf if param.lo is None else param.lo
    hi = math.inf if param.hi is None else param.hi
    return _value(raw, where, lo, hi, integer=param.type is int)


def upper(value: Value) -> float:
    """The largest value a (possibly drawn) number may take."""
    if isinstance(value, Draw):
        assert value.hi is not None
        return value.hi
    assert isinstance(value, int | float) and not isinstance(value, bool)
    return float(value)


def _run(raw: object) -> RunSpec:
    t = _Table(raw, "run")
    run = RunSpec(
        seed=t.integer("seed", 1, 0, MAX_SEED),
        duration=t.number("duration", 30.0, 0.001, MAX_SECONDS),
        quiet=t.number("quiet", 10.0, 0.0, MAX_SECONDS),
        topology=t.string("topology", "demo"),
    )
    t.done()
    if run.quiet >= run.duration:
        raise PlanError("run.quiet", f"must be shorter than run.duration ({run.duration:g})")
    return run


def _workload(raw: object, index: int) -> WorkloadSpec:
    t = _Table(raw, f"workload[{index}]")
    kind = t.get("kind", required=True)
    if kind not in WORKLOAD_KINDS:
        listed = ", ".join(repr(k) for k in WORKLOAD_KINDS)
        raise PlanError(t.at("kind"), f"must be one of {listed}, got {kind!r}")
    targets = t.strings("targets", ["all"])
    if not targets:
        raise PlanError(t.at("targets"), "at least one target")
    for i, selector in enumerate(targets):
        if selector == "all":
            continue
        try:
            target_kind = selector_kind(selector)
        except SelectorError as exc:
            raise PlanError(f"{t.at('targets')}[{i}]", str(exc)) from None
        allowed = (
            (TargetKind.DOMAIN,) if kind == "xenstore" else (TargetKind.DOMAIN, TargetKind.DEVICE)
        )
        if target_kind not in allowed:
            raise PlanError(
                f"{t.at('targets')}[{i}]", f"a {kind} workload cannot run on a {target_kind.value}"
            )
    spec = WorkloadSpec(
        index=index,
        kind=kind,
        targets=targets,
        rate=t.number("rate", 100.0, 0.0, 1e7),
        threads=t.integer("threads", 1, 1, 64),
        flush_every=t.integer("flush_every", 16 if kind == "block" else 0, 0, 1 << 20),
        blocks=t.integer("blocks", 64, 1, 1 << 20),
        size=t.integer("size", 4096 if kind == "block" else 1024, 1, 1 << 20),
    )
    if kind != "block" and t.has("flush_every"):
        raise PlanError(t.at("flush_every"), "only block workloads flush")
    t.done()
    return spec


def _fault(raw: object, index: int, run: RunSpec) -> FaultSpec:
    t = _Table(raw, f"fault[{index}]")
    kind_id = t.string("kind", required=True)
    fault_kind: FaultKind | None = CATALOGUE.get(kind_id)
    if fault_kind is None:
        family = kind_id.split(".")[0]
        near = [k for k in CATALOGUE if k.startswith(family + ".")] or list(CATALOGUE)[:6]
        raise PlanError(t.at("kind"), f"no fault kind {kind_id!r} (try {', '.join(near)})")
    target = t.string("target", required=True)
    try:
        target_kind = selector_kind(target)
    except SelectorError as exc:
        raise PlanError(t.at("target"), str(exc)) from None
    if target_kind not in fault_kind.targets:
        allowed = ", ".join(k.value for k in fault_kind.targets)
        raise PlanError(
            t.at("target"),
            f"{kind_id} cannot target a {target_kind.value} (it targets: {allowed})",
        )
    at = _value(t.get("at", 0.0), t.at("at"), 0.0, MAX_SECONDS)
    duration = _value(t.get("duration", required=True), t.at("duration"), 0.0, MAX_SECONDS)
    every_raw = t.get("every")
    every = None if every_raw is None else _number(every_raw, t.at("every"), 0.001, MAX_SECONDS)
    if every is not None and upper(duration) >= every:
        raise PlanError(t.at("every"), f"must be longer than the duration ({upper(duration):g})")
    end = upper(at) + upper(duration)
    if end > run.fault_phase + 1e-9:
        raise PlanError(
            t.at("duration"),
            f"the window may end at {end:g} s, after the fault phase "
            f"(run.duration {run.duration:g} - run.quiet {run.quiet:g})",
        )
    probability = count = None
    if t.has("probability") and t.has("count"):
        raise PlanError(t.at("count"), "give probability or count, not both")
    if t.has("probability"):
        probability = t.number("probability", 1.0, 0.0, 1.0)
    if t.has("count"):
        count = t.integer("count", 1, 1, 1 << 31)
    params: list[tuple[str, Value]] = []
    for param in fault_kind.params:
        raw_value = t.get(param.name, param.default)
        params.append((param.name, _param_value(param, raw_value, t.at(param.name))))
    t.done()
    return FaultSpec(index, kind_id, target, at, duration, every, probability, count, tuple(params))


def _checks(raw: object) -> ChecksSpec:
    t = _Table(raw, "checks")
    liveness = t.number("liveness", 10.0, 0.0, MAX_SECONDS)
    unaffected = t.strings("unaffected", []) if t.has("unaffected") else None
    t.done()
    return ChecksSpec(liveness, unaffected)


def _array(raw: Mapping[str, Any], key: str) -> list[object]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise PlanError(key, f"expected an array of tables ([[{key}]])")
    return value


def parse(
    raw: Mapping[str, Any], name: str, base_dir: Path | None = None, source: str = ""
) -> Plan:
    """Validate a decoded TOML document."""
    top = _Table(raw, "")
    plan_name = top.string("name", name)
    description = top.string("description", "")
    run = _run(top.get("run", {}))
    workloads = tuple(_workload(w, i) for i, w in enumerate(_array(raw, "workload")))
    faults = tuple(_fault(f, i, run) for i, f in enumerate(_array(raw, "fault")))
    checks = _checks(top.get("checks", {}))
    top.used.update(("workload", "fault"))
    top.done()
    return Plan(
        plan_name, description, run, workloads, faults, checks, base_dir, source or plan_name
    )


def loads(text: str, name: str = "plan", base_dir: Path | None = None, source: str = "") -> Plan:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(source or name, f"not valid TOML: {exc}") from None
    return parse(raw, name, base_dir, source)


def load(path: Path) -> Plan:
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(str(path), f"cannot read: {exc.strerror}") from None
    return loads(text, path.stem, path.parent, str(path))


# -- built-in plans ---------------------------------------------------------------------------


def builtin_names() -> list[str]:
    folder = resources.files("xenpv.faults") / "plans"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def builtin(name: str) -> Plan:
    folder = resources.files("xenpv.faults") / "plans"
    source = folder / f"{name}.toml"
    if not source.is_file():
        raise PlanError(name, f"no built-in plan (built-in: {', '.join(builtin_names())})")
    return loads(source.read_text(), name)


def load_any(spec: str) -> Plan:
    """A plan file path, or the name of a built-in plan."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return load(path)
    return builtin(spec)


# -- against a topology -----------------------------------------------------------------------


def resolve_topology(plan: Plan) -> Topology:
    if plan.run.topology == "demo":
        return default_topology()
    path = Path(plan.run.topology)
    if not path.is_absolute() and plan.base_dir is not None:
        path = plan.base_dir / path
    try:
        return load_topology(path)
    except TopologyError as exc:
        raise PlanError("run.topology", str(exc)) from None


def check_targets(plan: Plan, targets: Targets) -> None:
    """Every selector names something in the topology; errors name the field."""
    for w in plan.workloads:
        for i, selector in enumerate(w.targets):
            if selector == "all":
                continue
            try:
                targets.candidates(selector)
            except SelectorError as exc:
                raise PlanError(f"workload[{w.index}].targets[{i}]", str(exc)) from None
    for f in plan.faults:
        try:
            targets.candidates(f.target)
        except SelectorError as exc:
            raise PlanError(f"{f.where}.target", str(exc)) from None
    for i, guest in enumerate(plan.checks.unaffected or ()):
        if targets.roles.get(guest) != "guest":
            raise PlanError(f"checks.unaffected[{i}]", f"no guest named {guest!r}")
