"""Plan files: strict validation with errors that name the field; the built-in plans."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.faults import plan, schedule
from xenpv.faults.plan import PlanError

RUN = """
[run]
seed = 1
duration = 30.0
quiet = 10.0
"""


def _fault(body: str) -> str:
    return RUN + "[[fault]]\n" + body


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("bogus = 1\n" + RUN, r"^bogus: unknown key"),
        (RUN + "bogus = 1\n", r"^run.bogus: unknown key"),
        ("[run]\nquiet = 40.0\nduration = 30.0\n", r"^run.quiet: must be shorter"),
        ("[run]\nseed = -1\n", r"^run.seed: must be between"),
        (RUN + '[[workload]]\nkind = "disk"\n', r"^workload\[0\].kind: must be one of"),
        (
            RUN + '[[workload]]\nkind = "net"\nflush_every = 2\n',
            r"^workload\[0\].flush_every: only block workloads flush",
        ),
        (
            RUN + '[[workload]]\nkind = "xenstore"\ntargets = ["device:g:vbd:xvda"]\n',
            r"^workload\[0\].targets\[0\]: a xenstore workload cannot run on a device",
        ),
        (
            _fault('kind = "link.nope"\ntarget = "any-link"\nduration = 1.0\n'),
            r"fault\[0\].kind: no",
        ),
        (_fault('kind = "link.loss"\ntarget = "link:ab"\nduration = 1.0\n'), r"fault\[0\].target"),
        (
            _fault('kind = "storage.eio"\ntarget = "domain:g"\nduration = 1.0\n'),
            r"^fault\[0\].target: storage.eio cannot target a domain \(it targets: device\)",
        ),
        (
            _fault('kind = "link.loss"\ntarget = "any-link"\nat = 15.0\nduration = 6.0\n'),
            r"^fault\[0\].duration: the window may end at 21 s, after the fault phase",
        ),
        (
            _fault('kind = "link.loss"\ntarget = "any-link"\nduration = 2.0\nevery = 1.0\n'),
            r"^fault\[0\].every: must be longer than the duration",
        ),
        (
            _fault('kind = "link.loss"\ntarget = "any-link"\nduration = 1\nprobability = 2\n'),
            r"^fault\[0\].probability: must be between 0 and 1",
        ),
        (
            _fault(
                'kind = "link.loss"\ntarget = "any-link"\nduration = 1\ncount = 1\n'
                "probability = 0.5\n"
            ),
            r"^fault\[0\].count: give probability or count, not both",
        ),
        (
            _fault(
                'kind = "link.partition"\ntarget = "any-link"\nduration = 1\n'
                'direction = "sideways"\n'
            ),
            r"^fault\[0\].direction: must be one of 'both', 'one-way'",
        ),
        (
            _fault('kind = "link.delay"\ntarget = "any-link"\nduration = 1\ndelay = [2, 1]\n'),
            r"^fault\[0\].delay: range \[2, 1\] is empty",
        ),
        (_fault('kind = "link.loss"\ntarget = "any-link"\n'), r"^fault\[0\].duration: missing"),
        (RUN + "[checks]\nliveness = -1\n", r"^checks.liveness: must be between"),
        ("not toml [", r"^plan: not valid TOML"),
    ],
)
def test_errors_name_the_field(text: str, error: str) -> None:
    with pytest.raises(PlanError, match=error):
        plan.loads(text)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("domain:zz", r"^fault\[0\].target: no domain named 'zz'"),
        ("link:guest4k-zz", r"^fault\[0\].target: link:guest4k-zz: no two domains"),
        ("device:guest4k:vbd:xvdb", r"^fault\[0\].target: no device 'device:guest4k:vbd:xvdb'"),
    ],
)
def test_targets_are_checked_against_the_topology(target: str, error: str) -> None:
    kind = "link.loss" if target.startswith(("domain", "link")) else "storage.latency"
    p = plan.loads(_fault(f'kind = "{kind}"\ntarget = "{target}"\nduration = 1.0\n'))
    with pytest.raises(PlanError, match=error):
        schedule.build(p)


def test_unaffected_must_name_guests() -> None:
    p = plan.loads(RUN + '[checks]\nunaffected = ["backend"]\n')
    with pytest.raises(PlanError, match=r"checks.unaffected\[0\]: no guest named 'backend'"):
        schedule.build(p)


def test_topology_path_is_relative_to_the_plan(tmp_path: Path) -> None:
    (tmp_path / "topo.toml").write_text(
        '[[domain]]\nname = "be"\nrole = "backend"\n[[domain]]\nname = "g-1"\n'
        '[[vbd]]\nfrontend = "g-1"\nbackend = "be"\n'
    )
    (tmp_path / "p.toml").write_text(
        RUN.replace("quiet = 10.0", 'quiet = 10.0\ntopology = "topo.toml"')
        + '[[fault]]\nkind = "link.loss"\ntarget = "link:g-1-be"\nduration = 1.0\n'
    )
    sched = schedule.build(plan.load(tmp_path / "p.toml"))
    assert sched.faults[0].target == "link:g-1-be"
    assert [d.id for d in sched.topology.devices] == ["device:g-1:vbd:xvda"]
    (tmp_path / "p.toml").write_text(RUN.replace("quiet = 10.0", 'quiet = 10.0\ntopology = "x"'))
    with pytest.raises(PlanError, match=r"^run.topology: .*cannot read"):
        schedule.build(plan.load(tmp_path / "p.toml"))


NAMED = (
    "smoke backend-killed-mid-write xenstored-restart grant-eagain double-fetch watch-flood "
    "event-storm power-cut partition sector-eio event grant ring xenstore process link storage "
    "hotplug"
)


def test_builtin_plans_load_and_schedule() -> None:
    names = plan.builtin_names()
    assert set(NAMED.split()) <= set(names)
    for name in names:
        p = plan.builtin(name)
        sched = schedule.build(p)
        assert sched.faults, name
        assert p.description, name
        assert all(f.stop <= p.run.fault_phase + 1e-6 for f in sched.faults), name
    smoke = plan.builtin("smoke")
    assert smoke.run.duration < 60
    families = {f.kind.split(".")[0] for f in smoke.faults}
    # Every family `faults run` can inject; ring has no seam yet.
    assert families == {"event", "grant", "xenstore", "process", "link", "storage", "device"}


def test_unknown_builtin() -> None:
    with pytest.raises(PlanError, match="no built-in plan"):
        plan.load_any("no-such-plan")


KEYS = st.sampled_from(
    [
        "run",
        "seed",
        "duration",
        "quiet",
        "topology",
        "workload",
        "fault",
        "checks",
        "kind",
        "target",
        "at",
        "every",
        "probability",
        "count",
        "delay",
        "direction",
        "targets",
        "liveness",
        "unaffected",
        "rate",
        "name",
        "sector",
        "op",
    ]
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-5, 100),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["link.loss", "storage.eio", "any-link", "domain:zz", "demo", "block"]),
)
TOML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.dictionaries(KEYS, TOML_VALUES, max_size=5))
def test_any_document_is_a_plan_or_one_clear_error(raw: dict[str, object]) -> None:
    try:
        p = plan.parse(raw, "fuzz")
        schedule.build(p)
    except PlanError as exc:
        assert ": " in str(exc)


def test_plans_whose_families_have_injectors_are_fully_injectable() -> None:
    from backends.storage import MemoryDisk
    from xenpv.faults.injectors import Injection
    from xenpv.faults.link import LinkInjector
    from xenpv.faults.process import ProcessInjector
    from xenpv.faults.storage import FaultyStorage, StorageInjector

    for name in (
        "link",
        "storage",
        "process",
        "partition",
        "power-cut",
        "sector-eio",
        "backend-killed-mid-write",
        "xenstored-restart",
    ):
        sched = schedule.build(plan.builtin(name))
        domids = {n: i for i, n in enumerate(sched.topology.roles)}
        disks = {
            d.id: FaultyStorage(MemoryDisk(1 << 16), write_cache=True)
            for d in sched.topology.devices
            if d.cls == "vbd"
        }
        injectors = [
            LinkInjector(domids, seed=sched.seed),
            StorageInjector(disks),
            ProcessInjector(lambda n: None, restart=lambda n: None),
        ]
        Injection(injectors).check(sched.faults)  # raises NoInjector otherwise


def test_the_documented_examples_are_valid_plans() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "faults.md").read_text()
    example = docs.split("## Plan format", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    assert schedule.build(plan.loads(example)).faults
    module_doc = plan.__doc__ or ""
    example = module_doc.split("```toml\n", 1)[1].split("```", 1)[0]
    assert schedule.build(plan.loads(example)).faults
