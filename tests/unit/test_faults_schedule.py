"""Schedules: the same seed gives the same schedule and hash; streams are independent."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.faults import plan, schedule
from xenpv.faults.schedule import Schedule, stream

PLAN = """
[run]
duration = 60.0
quiet = 10.0
[[workload]]
kind = "block"
[[fault]]
kind = "link.partition"
target = "any-link"
at = [0.0, 5.0]
duration = [1.0, 4.0]
every = 10.0
direction = ["both", "one-way"]
[[fault]]
kind = "storage.eio"
target = "any-vbd"
at = [1.0, 20.0]
duration = 5.0
sector = [0, 100]
"""
EXTRA = """
[[fault]]
kind = "link.delay"
target = "any-link"
at = [0.0, 40.0]
duration = 1.0
delay = [0.0, 0.1]
"""
BASE = plan.loads(PLAN)
WITH_EXTRA = plan.loads(PLAN + EXTRA)


@settings(max_examples=30)
@given(st.integers(0, 2**63 - 1))
def test_same_seed_same_schedule_and_hash(seed: int) -> None:
    a = schedule.build(BASE, seed)
    b = schedule.build(plan.loads(PLAN), seed)
    assert a == b
    assert a.hash == b.hash
    assert Schedule.from_json(a.to_json()) == a  # the history carries it losslessly


@settings(max_examples=30)
@given(st.integers(0, 2**62), st.integers(1, 2**62))
def test_different_seeds_give_different_hashes(seed: int, delta: int) -> None:
    assert schedule.build(BASE, seed).hash != schedule.build(BASE, seed + delta).hash


@settings(max_examples=20)
@given(st.integers(0, 2**63 - 1))
def test_an_extra_fault_does_not_shift_the_others(seed: int) -> None:
    base = schedule.build(BASE, seed)
    more = schedule.build(WITH_EXTRA, seed)
    assert [f for f in more.faults if f.spec != 2] == list(base.faults)


def test_windows_repeat_and_stay_in_the_fault_phase() -> None:
    sched = schedule.build(BASE, 5)
    partitions = [f for f in sched.faults if f.kind == "link.partition"]
    assert len(partitions) >= 4
    assert all(f.stop <= 50.0 for f in sched.faults)
    starts = [f.start for f in partitions]
    assert all(abs(b - a - 10.0) < 1e-6 for a, b in itertools.pairwise(starts))
    assert {f.id for f in partitions} == {f"f0.{i}" for i in range(len(partitions))}
    eio = next(f for f in sched.faults if f.kind == "storage.eio")
    assert 0 <= int(eio.param("sector")) <= 100 and eio.param("op") == "read"


def test_streams_are_split_by_name() -> None:
    assert stream(1, "a").random() == stream(1, "a").random()
    assert stream(1, "a").random() != stream(1, "b").random()
    assert stream(1, "a").random() != stream(2, "a").random()


def test_unaffected_defaults_to_untouched_guests() -> None:
    p = plan.loads(
        '[run]\nduration = 20.0\nquiet = 5.0\n[[fault]]\nkind = "storage.latency"\n'
        'target = "device:guest4k:vbd:xvda"\nduration = 1.0\n'
    )
    assert schedule.build(p).unaffected == ("guest16k", "guest64k")


def test_events_put_stops_before_starts_and_source_is_not_hashed() -> None:
    sched = schedule.build(BASE, 5)
    events = sched.events()
    assert len(events) == 2 * len(sched.faults)
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    for (t1, a1, _), (t2, a2, _) in itertools.pairwise(events):
        assert not (t1 == t2 and a1 == "start" and a2 == "stop")
    moved = plan.loads(PLAN, source="/elsewhere/p.toml")
    assert schedule.build(moved, 5).hash == sched.hash
    assert schedule.build(moved, 5).source == "/elsewhere/p.toml"
