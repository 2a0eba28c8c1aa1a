"""`xenpv faults run PLAN --mode sim`: the same plan, schedule, agents, workloads, history and
checkers as a real run, with the cluster simulated (xenpv/sim/cluster.py) in one seeded,
virtual-time trio run."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from xenpv import clock
from xenpv.faults import runner
from xenpv.faults.plan import Plan
from xenpv.faults.schedule import Schedule, build
from xenpv.sim import kernel
from xenpv.sim.cluster import run_cluster
from xenpv.sim.entropy import Entropy
from xenpv.toolstack.progress import NO_PROGRESS

# Not simulated yet: process faults (the sim would cancel or freeze a domain's tasks, or
# xenstored's). xenstored's own agent runs inside the simulated xenstored.
UNSIMULATED = runner.PROCESS_KINDS
# History fields that are not a function of the seed (none today: every time is virtual).
_UNHASHED: frozenset[str] = frozenset()


class SimRunError(runner.RunError):
    pass


def check_simulable(schedule: Schedule) -> None:
    kinds = sorted({f.kind for f in schedule.faults if f.kind in UNSIMULATED})
    if kinds:
        raise SimRunError(f"--mode sim cannot inject {', '.join(kinds)} yet (use the real mode)")


class _CausalClock:
    """Virtual time that never reads the same twice: many things happen at one virtual
    instant (the sim runs no clock while it computes), but histories are merged by time, so
    each read is at least a microsecond (their resolution) after the last one. In one
    thread that order is the order things happened."""

    def __init__(self) -> None:
        self._last = -1.0

    def __call__(self) -> float:
        self._last = max(trio.current_time(), self._last + TICK)
        return self._last


TICK = 2e-6  # two units of the history's 1 µs resolution: rounding never makes a tie


@contextmanager
def _sim_environment() -> Iterator[None]:
    saved = os.environ.get("XENPV_FAULTS")
    os.environ["XENPV_FAULTS"] = "1"  # backends wrap their disks for storage faults
    clock.install(_CausalClock())
    try:
        yield
    finally:
        clock.install(None)
        if saved is None:
            del os.environ["XENPV_FAULTS"]
        else:
            os.environ["XENPV_FAULTS"] = saved


def run_plan_sim(
    plan: Plan, seed: int | None, state_dir: Path, history_path: Path | None = None
) -> tuple[runner.RunResult, kernel.SimResult[None]]:
    schedule = build(plan, seed)
    runner.check_injectable(schedule)
    check_simulable(schedule)
    topo = runner.run_topology(plan, schedule)
    history_dir = state_dir / "history"
    runner.fresh_history_dir(history_dir)

    async def main(_entropy: Entropy) -> None:
        async with run_cluster(topo, state_dir / "cluster") as cluster:
            # No process faults in a sim (refused above): no process injector, no supervisor.
            await runner._run(
                cluster.xs, dict(cluster.domids), None, schedule, history_dir, NO_PROGRESS
            )

    with _sim_environment():
        sim = kernel.run(main, schedule.seed)
    out = history_path or (state_dir / "history.jsonl")
    return runner.collect(schedule, history_dir, out), sim


def history_hash(path: Path) -> str:
    """sha256 of the history's lines (minus any wall-clock fields)."""
    digest = hashlib.sha256()
    for line in path.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        if isinstance(raw, dict):
            for name in _UNHASHED:
                raw.pop(name, None)
        digest.update(json.dumps(raw, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def run_in_temp_dir(
    plan: Plan, seed: int | None, history_path: Path | None = None
) -> tuple[runner.RunResult, kernel.SimResult[None], str]:
    with tempfile.TemporaryDirectory(prefix="xenpv-sim-") as tmp:
        result, sim = run_plan_sim(plan, seed, Path(tmp), history_path)
        digest = history_hash(result.history_path)
        if history_path is None:  # the history lives in the temporary directory
            result = runner.RunResult(result.schedule, result.history, result.violations, Path("-"))
    return result, sim, digest
