"""The shrinker without the sim: ddmin over lists, the pinned plan, the shrink steps with a
fake run, and the swarm's choice of fault families."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.faults import plan as plan_mod
from xenpv.faults.schedule import build
from xenpv.faults.shrink import Candidate, Shrinker, ShrinkError, ddmin, pinned_plan, relocated
from xenpv.sim.swarm import chosen_families, families, swarm_plan

REISSUE = Path(__file__).resolve().parents[1] / "data" / "sim" / "reissue.toml"


def test_ddmin_finds_the_two_elements_a_failure_needs() -> None:
    asked: list[list[int]] = []

    def fails(xs: list[int]) -> bool:
        asked.append(xs)
        return 3 in xs and 7 in xs

    assert ddmin(list(range(10)), fails) == [3, 7]
    assert len(asked) < 40


def test_ddmin_returns_nothing_when_the_failure_needs_nothing() -> None:
    assert ddmin([1, 2, 3], lambda xs: True) == []
    assert ddmin([], lambda xs: True) == []


def test_ddmin_keeps_a_single_needed_element_and_the_order() -> None:
    assert ddmin(["a", "b", "c", "d", "e"], lambda xs: "d" in xs) == ["d"]
    assert ddmin([5, 1, 4, 2], lambda xs: {1, 2} <= set(xs)) == [1, 2]


@settings(max_examples=60, deadline=None)
@given(
    items=st.lists(st.integers(0, 50), min_size=1, max_size=24, unique=True),
    data=st.data(),
)
def test_ddmin_result_fails_and_is_one_minimal(items: list[int], data: st.DataObject) -> None:
    needed = set(data.draw(st.lists(st.sampled_from(items), max_size=4)))

    def fails(xs: list[int]) -> bool:
        return needed <= set(xs)

    out = ddmin(items, fails)
    assert fails(out)
    assert set(out) == needed  # 1-minimal: dropping any element passes
    assert out == [x for x in items if x in needed]


def test_pinned_plan_reproduces_the_seeds_faults() -> None:
    plan = plan_mod.load_any("link")
    schedule = build(plan, 5)
    candidate = Candidate(schedule.faults, plan.workloads, plan.run.duration)
    pinned = plan_mod.loads(pinned_plan(plan, schedule, candidate, "demo"), "pinned")
    again = build(pinned, 5)
    drawn = [
        (f.kind, f.target, f.start, f.stop, f.probability, f.count, f.params) for f in again.faults
    ]
    want = [
        (f.kind, f.target, f.start, f.stop, f.probability, f.count, f.params)
        for f in schedule.faults
    ]
    assert sorted(drawn) == sorted(want)
    assert again.unaffected == schedule.unaffected
    assert [w.targets for w in again.workloads] == [w.targets for w in schedule.workloads]


def test_relocated_changes_only_the_run_topology() -> None:
    plan = plan_mod.load(REISSUE)
    schedule = build(plan, 1)
    text = pinned_plan(
        plan, schedule, Candidate((), plan.workloads, plan.run.duration), "/abs/topology.toml"
    )
    moved = relocated(text, "topology.toml")
    assert 'topology = "topology.toml"' in moved
    assert moved.replace('"topology.toml"', '"/abs/topology.toml"') == text


def _shrinker(needs: str) -> Shrinker:
    """A shrinker over the `storage` plan whose fake run fails `block` while a fault of kind
    `needs` longer than 0.5 s is in the plan."""
    plan = plan_mod.load_any("storage")
    schedule = build(plan, 2)

    def attempt(candidate: plan_mod.Plan) -> frozenset[str]:
        hit = any(
            f.kind == needs and isinstance(f.duration, float) and f.duration > 0.5
            for f in candidate.faults
        )
        return frozenset({"block"} if hit else ())

    return Shrinker(plan, schedule, "block", attempt, "demo")


def test_shrinker_keeps_the_needed_fault_shortens_it_and_cuts_the_run() -> None:
    shrinker = _shrinker("storage.enospc")
    result = shrinker.run()
    assert len(result.before.faults) == 5
    assert [f.kind for f in result.after.faults] == ["storage.enospc"]
    (fault,) = result.after.faults
    assert 0.5 < fault.stop - fault.start <= 1.0  # 4 s halved while it still failed
    assert result.after.duration < result.before.duration
    assert [w.threads for w in result.after.workloads] == [1]
    shrunk = plan_mod.loads(result.text, "shrunk")
    assert [f.kind for f in shrunk.faults] == ["storage.enospc"]
    assert result.attempts == shrinker.attempts


def test_shrinker_refuses_when_the_pinned_plan_does_not_fail() -> None:
    with pytest.raises(ShrinkError, match="do not fail block"):
        _shrinker("storage.no-such-kind").run()


def test_swarm_choice_is_a_function_of_the_seed_with_at_least_one_family() -> None:
    plan = plan_mod.load_any("smoke")
    every = families(plan)
    assert len(every) >= 5
    seen = set()
    for seed in range(40):
        on = chosen_families(plan, seed)
        assert on == chosen_families(plan, seed)
        assert on and set(on) <= set(every)
        seen.add(on)
        chosen = swarm_plan(plan, seed)
        assert {f.kind.split(".")[0] for f in chosen.faults} == set(on)
        original = {f.index: f for f in plan.faults}
        assert all(original[f.index] == f for f in chosen.faults)  # indices kept
    assert len(seen) > 10


def test_swarm_keeps_each_faults_schedule() -> None:
    plan = plan_mod.load(REISSUE)
    for seed in range(1, 9):
        full = {f.id: f for f in build(plan, seed).faults}
        for f in build(swarm_plan(plan, seed), seed).faults:
            assert full[f.id] == f


def test_a_plan_without_faults_has_no_families() -> None:
    plan = dataclasses.replace(plan_mod.load(REISSUE), faults=())
    assert chosen_families(plan, 3) == ()
    assert swarm_plan(plan, 3).faults == ()
