"""The planted blkfront bug found by `faults swarm`, reproduced by its seed and shrunk.

With XENPV_PLANT_BUG=blkfront-reissue (docs/faults.md, "Simulation") blkfront acknowledges
one unfinished write at each reconnect instead of re-issuing it. A swarm over a few seeds of
tests/data/sim/reissue.toml (a link partition and a bad response id on a one-guest cluster)
must find a seed the block checker fails; that seed must fail again, identically, on every
rerun; shrink must bring it down to at most two faults that still fail; and without the bug
the same seed passes.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from frontends.blkfront.device import PLANT_BUG_ENV, PLANTED_LOST_REISSUE
from tests.integration.hv_pair import REPO
from tests.integration.xenpv_cli import last_json, xenpv
from xenpv.faults import plan as plan_mod
from xenpv.sim import faults as sim_faults
from xenpv.sim.swarm import swarm_plan

pytestmark = pytest.mark.slow  # about 30-40 s of wall time on a loaded 2-core machine

PLAN = REPO / "tests" / "data" / "sim" / "reissue.toml"
SEEDS = (5, 4)  # --first-seed, --seeds: seeds 5..8, of which 6 and 7 lose a write


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory for the children's TMPDIR (a failing swarm keeps its seeds'
    logs there), with a short path: a simulated cluster binds Unix sockets inside it."""
    with tempfile.TemporaryDirectory(prefix="xenpv-t-") as tmp:
        yield Path(tmp)


def _xenpv(
    *args: str, tmp: Path, timeout: float = 240, planted: bool = True
) -> subprocess.CompletedProcess[str]:
    bug = PLANTED_LOST_REISSUE if planted else None
    return xenpv(*args, timeout=timeout, env={"TMPDIR": str(tmp), PLANT_BUG_ENV: bug})


@pytest.mark.timeout(300)  # a swarm, three reruns and a shrink of about ten runs
def test_swarm_finds_the_planted_bug_and_shrink_keeps_it(
    tmp_path: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, count = SEEDS
    swarm = _xenpv(
        "faults", "swarm", str(PLAN), "--first-seed", str(first), "--seeds", str(count),
        "--jobs", "2", "--json", tmp=short_tmp,
    )  # fmt: skip
    summary = last_json(swarm)
    assert swarm.returncode == 1, swarm.stdout + swarm.stderr
    assert summary["seeds"] == list(range(first, first + count))
    failed = summary["failed"]
    assert isinstance(failed, list) and failed
    assert summary["failures"] == dict.fromkeys((str(s) for s in failed), "block")
    seed = failed[0]
    assert isinstance(seed, int)
    assert f"xenpv faults run {PLAN} --mode sim --seed {seed} --swarm" in swarm.stdout

    # The seed's repro (its swarm choice of families included) fails the same way each time.
    plan = swarm_plan(plan_mod.load(PLAN), seed)
    monkeypatch.setenv(PLANT_BUG_ENV, PLANTED_LOST_REISSUE)
    digests = set()
    for _ in range(3):
        result, _sim, digest = sim_faults.run_in_temp_dir(plan, seed)
        assert "block" in {v.checker for v in result.violations}
        digests.add(digest)
    assert len(digests) == 1

    out = tmp_path / "shrunk"
    shrink = _xenpv(
        "faults",
        "shrink",
        str(PLAN),
        "--seed",
        str(seed),
        "--swarm",
        "--out",
        str(out),
        "--json",
        tmp=short_tmp,
    )
    assert shrink.returncode == 0, shrink.stdout + shrink.stderr
    shrunk = last_json(shrink)
    assert shrunk["checker"] == "block" and shrunk["fails_again"] is True
    faults_after = shrunk["faults_after"]
    assert isinstance(faults_after, int) and faults_after <= 2
    assert "faults" in shrink.stdout and "->" in shrink.stdout
    small = plan_mod.load(out / "plan.toml")
    assert len(small.faults) == faults_after
    assert (out / "history.jsonl").is_file() and (out / "report.html").is_file()
    rerun, _sim, _digest = sim_faults.run_in_temp_dir(small, seed)
    assert "block" in {v.checker for v in rerun.violations}

    # Without the planted bug the same seed, and its shrunk plan, pass.
    monkeypatch.delenv(PLANT_BUG_ENV)
    fixed, _sim, _digest = sim_faults.run_in_temp_dir(plan, seed)
    assert fixed.ok, [v.line() for v in fixed.violations]
    fixed_small, _sim, _digest = sim_faults.run_in_temp_dir(small, seed)
    assert fixed_small.ok, [v.line() for v in fixed_small.violations]


def test_swarm_without_the_bug_passes_every_seed(short_tmp: Path) -> None:
    result = _xenpv(
        *("faults", "swarm", str(PLAN), "--first-seed", "6", "--seeds", "2", "--jobs", "2"),
        "--json",
        tmp=short_tmp,
        planted=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = last_json(result)
    assert summary["failed"] == [] and summary["passed"] == 2
