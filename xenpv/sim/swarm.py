"""Swarm testing: each seed also chooses which fault families of a plan are on.

A plan with faults of several families (`link`, `ring`, `storage`, ...) tests their mix;
swarm testing (Groce et al., 2012) runs each seed with a random subset of them instead, so
that a failure needing one family alone, or a family's absence, is found too. Each family is
on with probability 1/2, at least one; the choice comes from the seed's `swarm/families`
stream (xenpv/sim/entropy.py), so `xenpv faults run PLAN --mode sim --seed N --swarm` alone
reproduces what `xenpv faults swarm` ran for seed N (docs/faults.md, "Simulation").
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from xenpv.faults import runner
from xenpv.faults.plan import Plan
from xenpv.sim import faults as sim_faults
from xenpv.sim.entropy import Entropy

STREAM = "swarm/families"


def families(plan: Plan) -> tuple[str, ...]:
    """The plan's fault families, in the order they first appear."""
    return tuple(dict.fromkeys(f.kind.split(".")[0] for f in plan.faults))


def chosen_families(plan: Plan, seed: int) -> tuple[str, ...]:
    """The families seed `seed` turns on: each with p = 1/2, at least one (none if the plan
    has no faults)."""
    every = families(plan)
    if not every:
        return ()
    rng = Entropy(seed).stream(STREAM)
    on = tuple(f for f in every if rng.random() < 0.5)
    return on or (rng.choice(every),)


def swarm_plan(plan: Plan, seed: int) -> Plan:
    """`plan` with only the faults of the families `seed` chooses. Each fault keeps its
    index, so its schedule streams (`fault[i]/...`) and its occurrences' ids are unchanged."""
    on = set(chosen_families(plan, seed))
    kept = tuple(f for f in plan.faults if f.kind.split(".")[0] in on)
    return dataclasses.replace(plan, faults=kept)


def run_seed(plan: Plan, seed: int, *, swarm: bool, check_determinism: bool) -> dict[str, Any]:
    """One seed of a swarm, as `xenpv faults run PLAN --mode sim --seed SEED [--swarm]
    [--check-determinism]` runs it: its verdict as a JSON-ready record. A seed that cannot
    run to a verdict (a bug, a refused plan) is a record with `error`, never an exception:
    one bad seed must not end the worker running the others."""
    record: dict[str, Any] = {"seed": seed}
    try:
        chosen = swarm_plan(plan, seed) if swarm else plan
        result, sim, digest = sim_faults.run_in_temp_dir(chosen, seed)
        record.update(
            ok=result.ok,
            checkers=result.per_checker(),
            history_hash=digest,
            simulated_seconds=round(sim.simulated_seconds, 3),
        )
        if check_determinism:
            _again, _sim, digest_again = sim_faults.run_in_temp_dir(chosen, seed)
            record["deterministic"] = digest_again == digest
    except (runner.RunError, OSError, ValueError) as exc:
        record["error"] = str(exc)
    except Exception as exc:  # a bug in the code under test: reported with the seed
        record["error"] = f"internal error: {exc!r}"
    return record


def serve_seeds(plan: Plan, *, swarm: bool, check_determinism: bool) -> None:
    """A swarm worker (`xenpv faults swarm-worker`): one seed per stdin line, one JSON
    record per stdout line, until stdin ends. One interpreter runs many seeds, so a seed
    costs its simulation, not a Python start; each seed's run is a fresh trio run on a fresh
    cluster in a fresh directory, which is also what makes `--check-determinism` compare
    two runs in one process."""
    for line in sys.stdin:
        if not line.strip():
            continue
        record = run_seed(plan, int(line), swarm=swarm, check_determinism=check_determinism)
        sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
        sys.stdout.flush()
