"""The demo topology through the smoke plan's simulable faults in sim mode, twice."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from xenpv.faults import plan as plan_mod
from xenpv.sim import faults as sim_faults

pytestmark = pytest.mark.slow  # ~1-2 min of wall time per run on a loaded 2-core machine


@pytest.fixture(scope="module")
def two_runs() -> tuple[Any, ...]:
    """The smoke plan's simulable faults on the demo topology, seed 1, run twice."""
    plan = plan_mod.load_any("smoke")
    simulable = tuple(f for f in plan.faults if f.kind not in sim_faults.UNSIMULATED)
    plan = dataclasses.replace(plan, faults=simulable)
    first, sim, digest = sim_faults.run_in_temp_dir(plan, 1)
    _second, _sim, digest_again = sim_faults.run_in_temp_dir(plan, 1)
    return plan, simulable, first, sim, digest, digest_again


@pytest.mark.timeout(600)  # two runs of about 70 s each on a quiet 2-core machine
def test_smoke_plan_in_sim_runs_every_fault_and_passes(two_runs: tuple[Any, ...]) -> None:
    plan, simulable, first, sim, _digest, _again = two_runs
    assert first.history.finished
    assert first.faults_injected == len(simulable)
    assert sim.simulated_seconds >= plan.run.duration
    assert first.ok, [v.line() for v in first.violations]


@pytest.mark.xfail(
    strict=False,
    reason="known: the demo topology's history sometimes differs between two runs in one "
    "process (cause not found yet; docs/faults.md, Simulation)",
)
@pytest.mark.timeout(600)
def test_smoke_plan_in_sim_is_deterministic(two_runs: tuple[Any, ...]) -> None:
    _plan, _simulable, _first, _sim, digest, digest_again = two_runs
    assert digest == digest_again
