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

from xenpv.faults.plan import Plan
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
