"""The runner's decisions before and during a run: which kinds it can inject, which domains
apply each fault, and the injector that keeps every control node's fault list."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.faults_helpers import QUIET_PLAN, fault
from xenpv.faults import plan, schedule
from xenpv.faults.catalogue import KINDS
from xenpv.faults.runner import (
    AGENT_KINDS,
    INJECTABLE,
    ControlInjector,
    LineCounter,
    RunError,
    blocked_kinds,
    check_injectable,
    injectable,
    recipients,
)

DEMO = schedule.build(plan.builtin("smoke"))


def test_injectable_kinds_are_exactly_those_the_catalogue_does_not_excuse() -> None:
    for k in KINDS:
        assert injectable(k.id) == (k.why_not is None), k.id
        if k.why_not is None:
            assert k.id in INJECTABLE and k.injector is not None, k.id
    assert not injectable("no.such-kind")


def test_plans_that_cannot_run_are_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every catalogued kind is injectable today: pretend one is not (a new kind's seam).
    from xenpv.faults import catalogue

    monkeypatch.setitem(
        catalogue.NOT_YET, "grant.revoke-while-mapped", "needs a seam in the granter"
    )
    assert blocked_kinds(plan.builtin("smoke")) == []
    for name in ("ring", "double-fetch", "watch-flood", "xenstore"):
        assert blocked_kinds(plan.builtin(name)) == [], name
    revoke = plan.loads(
        QUIET_PLAN
        + '[[fault]]\nkind = "grant.revoke-while-mapped"\ntarget = "any-vbd"\nat = 1.0\n'
        + "duration = 1.0\n",
        "revoke",
    )
    assert blocked_kinds(revoke) == ["grant.revoke-while-mapped"]
    with pytest.raises(RunError, match=r"grant\.revoke-while-mapped cannot be injected.*granter"):
        check_injectable(schedule.build(revoke))
    check_injectable(DEMO)


@pytest.mark.parametrize(
    ("kind", "target", "expected"),
    [
        ("storage.eio", "device:guest4k:vbd:xvda", ["backend"]),
        ("event.delay", "device:guest4k:vbd:xvda", ["guest4k"]),
        ("event.storm", "domain:guest16k", ["guest16k"]),
        ("grant.map-fail", "device:guest16k:vbd:xvda", ["backend"]),
        ("grant.map-fail", "queue:guest16k:vbd:xvda:0", ["backend"]),
        ("xenstore.commit-eagain", "domain:guest4k", ["xenstored"]),
        ("xenstore.conn-reset", "domain:guest4k", ["xenstored"]),
        ("process.kill", "domain:guest4k", []),
    ],
)
def test_recipients(kind: str, target: str, expected: list[str]) -> None:
    assert recipients(fault(kind, target), DEMO) == expected


def test_link_faults_go_to_every_domain() -> None:
    who = recipients(fault("link.loss", "link:backend-guest4k"), DEMO)
    assert who == sorted(DEMO.topology.roles)


def test_control_injector_keeps_each_recipients_list_and_wakes_the_publisher() -> None:
    woken: list[int] = []
    inj = ControlInjector(DEMO, wake=lambda: woken.append(1))
    eio = fault("storage.eio", "device:guest4k:vbd:xvda", "f1.0")
    loss = fault("link.loss", "link:backend-guest4k", "f2.0")
    assert inj.handles(eio) and inj.handles(loss)
    assert not inj.handles(fault("process.stop", "domain:guest4k"))
    inj.start(eio)
    inj.start(loss)
    assert inj.faults_of("backend") == (eio, loss)
    assert inj.faults_of("guest4k") == (loss,)
    assert "backend" in inj.dirty and woken
    inj.dirty.clear()
    inj.stop(eio)
    assert inj.faults_of("backend") == (loss,)
    assert inj.dirty == {"backend"}
    inj.stop(loss)
    assert all(inj.faults_of(d) == () for d in DEMO.topology.roles)
    assert {k for k in AGENT_KINDS if k.startswith("storage.")} == {
        k.id for k in KINDS if k.family.value == "storage"
    }


def test_progress_counts_only_appended_lines(tmp_path: Path) -> None:
    counter = LineCounter(tmp_path)
    (tmp_path / "guest4k.jsonl").write_text("a\nb\n")
    assert counter.count() == 2
    with (tmp_path / "guest4k.jsonl").open("a") as f:
        f.write("c\n")
    (tmp_path / "runner.jsonl").write_text("d\n")
    assert counter.count() == 4
