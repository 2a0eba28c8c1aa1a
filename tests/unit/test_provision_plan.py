"""`xenpv.toolstack.provision`'s pure half: a topology's plan and its differences from a store."""

from __future__ import annotations

from pathlib import Path

from xenpv.toolstack import provision
from xenpv.toolstack.provision import LiveDomain, LiveState, Plan
from xenpv.toolstack.topology import DEFAULT_TOPOLOGY_TOML, default_topology, loads


def demo_plan(toml: str = DEFAULT_TOPOLOGY_TOML) -> Plan:
    return provision.plan_topology(
        loads(toml), endpoint=lambda spec: f"tcp:{spec.name}:7100", image_dir=Path("/img")
    )


def live_holding(plan: Plan) -> LiveState:
    """A store that holds exactly `plan` (domids 1.. in plan order)."""
    live = LiveState()
    for domid, d in enumerate(plan.domains, start=1):
        live.domains[d.name] = LiveDomain(
            d.name, domid, str(d.page_size), str(d.memory), d.endpoint, "00"
        )
    for device in plan.devices:
        ident = (
            device.cls,
            live.domains[device.frontend].domid,
            live.domains[device.backend].domid,
            device.devid,
        )
        live.devices.add(ident)
        live.keys[ident] = (dict(device.backend_keys), dict(device.frontend_keys))
    return live


def test_plan_of_the_demo() -> None:
    plan = demo_plan()
    assert [d.name for d in plan.domains] == [d.name for d in default_topology().domains]
    vbd = plan.devices[0]
    assert (vbd.cls, vbd.frontend, vbd.backend, vbd.devid) == ("vbd", "guest4k", "backend", 51712)
    assert vbd.backend_keys["params"] == "/img/guest4k.img"
    assert vbd.frontend_keys == {"virtual-device": "51712", "device-type": "disk"}
    vif = plan.devices[-1]
    assert (vif.cls, vif.frontend, vif.devid, vif.mac) == (
        "vif",
        "guest64k",
        0,
        "00:16:3e:00:00:03",
    )
    assert vif.backend_keys["mac"] == vif.frontend_keys["mac"] == "00:16:3e:00:00:03"


def test_a_store_holding_the_plan_has_no_differences() -> None:
    plan = demo_plan()
    assert provision.differences(plan, live_holding(plan)) == []


def test_runtime_keys_are_not_compared() -> None:
    plan = demo_plan()
    live = live_holding(plan)
    # Only the plan's keys are read from the store; extra live keys cannot matter.
    for back, front in live.keys.values():
        back["state"] = "4"
        front["ring-ref"] = "8"
    assert provision.differences(plan, live) == []


def test_each_difference_is_named() -> None:
    plan = demo_plan()
    live = live_holding(plan)
    other = demo_plan(DEFAULT_TOPOLOGY_TOML.replace('page_size = "16K"', 'page_size = "4K"'))
    assert provision.differences(other, live) == [
        "domain 'guest16k' page size: '16384' in the store, '4096' in the topology"
    ]
    bigger = demo_plan(DEFAULT_TOPOLOGY_TOML.replace('size = "16M"', 'size = "32M"', 1))
    assert provision.differences(bigger, live) == [
        "vbd 51712 of 'guest4k' (backend 'backend') backend xenpv-size:"
        " '16777216' in the store, '33554432' in the topology"
    ]
    moved = provision.plan_topology(
        loads(DEFAULT_TOPOLOGY_TOML),
        endpoint=lambda spec: f"tcp:{spec.name}.svc:7100",
        image_dir=Path("/img"),
    )
    assert len(provision.differences(moved, live)) == 4
    assert (
        "domain 'backend' link endpoint: 'tcp:backend:7100' in the store"
        in (provision.differences(moved, live)[0])
    )


def test_missing_and_extra_domains_and_devices() -> None:
    plan = demo_plan()
    fewer = demo_plan(DEFAULT_TOPOLOGY_TOML.split("[[vif]]")[0])  # no vifs
    assert provision.differences(fewer, live_holding(plan)) == [
        f"vif 0 of {name!r} (backend 'backend') is not in the topology"
        for name in ("guest4k", "guest16k", "guest64k")
    ]
    assert provision.differences(plan, live_holding(fewer)) == [
        f"vif 0 of {name!r} (backend 'backend') is not in the store"
        for name in ("guest4k", "guest16k", "guest64k")
    ]
    extra = (
        DEFAULT_TOPOLOGY_TOML + '\n[[domain]]\nname = "guest9"\npage_size = "4K"\nmemory = "64M"\n'
    )
    assert provision.differences(demo_plan(extra), live_holding(plan)) == [
        "domain 'guest9' is not in the store"
    ]
    assert provision.differences(plan, live_holding(demo_plan(extra))) == [
        "domain 'guest9' (5) is not in the topology"
    ]


def test_the_refusal_counts_what_it_does_not_show() -> None:
    problems = [f"difference {i}" for i in range(10)]
    message = str(provision._refusal(problems))
    assert "difference 5" in message and "difference 6" not in message
    assert "and 4 more" in message and "nothing was changed" in message
