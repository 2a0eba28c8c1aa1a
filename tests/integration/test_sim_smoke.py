"""The demo topology through the smoke plan in sim mode (its simulable faults), twice."""

from __future__ import annotations

import dataclasses

import pytest

from xenpv.faults import plan as plan_mod
from xenpv.sim import faults as sim_faults

pytestmark = pytest.mark.slow  # ~1-2 min of wall time per run on a loaded 2-core machine


@pytest.mark.timeout(600)  # two runs of about 70 s each on a quiet 2-core machine
def test_smoke_plan_in_sim_is_deterministic() -> None:
    plan = plan_mod.load_any("smoke")
    simulable = tuple(f for f in plan.faults if f.kind not in sim_faults.UNSIMULATED)
    plan = dataclasses.replace(plan, faults=simulable)
    first, sim, digest = sim_faults.run_in_temp_dir(plan, 1)
    _second, _sim, digest_again = sim_faults.run_in_temp_dir(plan, 1)
    assert first.history.finished
    assert first.faults_injected == len(simulable)
    assert sim.simulated_seconds >= plan.run.duration
    assert digest == digest_again
