"""The simulation's determinism check over a swarm: 200 seeds of a mixed plan, each run twice.

tests/data/sim/mixed.toml puts one fault of each of six families (event, grant, link, ring,
storage, device) on a one-guest cluster, with offsets and parameters drawn from the seed;
`faults swarm --check-determinism` runs every seed twice in its worker and fails a seed
whose two histories differ (docs/faults.md, "Simulation"). Every seed must pass its checkers
and be deterministic. The run's wall time is a figure for the notes, never asserted.
"""

from __future__ import annotations

import tempfile

import pytest

from frontends.blkfront.device import PLANT_BUG_ENV
from tests.integration.hv_pair import REPO
from tests.integration.xenpv_cli import last_json, xenpv

pytestmark = pytest.mark.slow  # about two minutes on a quiet 2-core machine

PLAN = REPO / "tests" / "data" / "sim" / "mixed.toml"
SEEDS = 200


@pytest.mark.timeout(900)
def test_two_hundred_seeds_of_a_mixed_plan_are_deterministic_and_pass() -> None:
    # A short TMPDIR: each simulated cluster binds Unix sockets inside it.
    with tempfile.TemporaryDirectory(prefix="xenpv-t-") as tmp:
        result = xenpv(
            *("faults", "swarm", str(PLAN), "--seeds", str(SEEDS), "--jobs", "2"),
            *("--check-determinism", "--json"),
            timeout=840,
            env={"TMPDIR": tmp, PLANT_BUG_ENV: None},
        )
    summary = last_json(result)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert summary["failed"] == [], summary["failures"]
    assert summary["seeds"] == list(range(1, SEEDS + 1))
    assert summary["passed"] == SEEDS and summary["check_determinism"] is True
    print(f"\n{SEEDS} seeds, each twice: {summary['seconds']} s")
