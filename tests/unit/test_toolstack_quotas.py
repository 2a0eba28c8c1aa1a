"""The launcher's quota planning (`xenpv.toolstack.quotas`): sized for the devices by default,
a too-small limit from the topology refused before anything starts, in one line."""

from __future__ import annotations

import pytest

from xenpv.toolstack.quotas import QuotaError, plan_quotas
from xenpv.toolstack.topology import TopologyError, loads


def _topology(guests: int, quota: str = "") -> str:
    lines = ['[[domain]]\nname = "backend"\nrole = "backend"\n']
    for i in range(guests):
        lines.append(f'[[domain]]\nname = "g{i}"\n')
    for i in range(guests):
        lines.append(f'[[vbd]]\nfrontend = "g{i}"\nbackend = "backend"\nsize = "1M"\n')
        lines.append(
            f'[[vif]]\nfrontend = "g{i}"\nbackend = "backend"\nmac = "00:16:3e:00:01:{i:02x}"\n'
        )
    return quota + "\n" + "\n".join(lines)


def test_small_topologies_keep_c_defaults() -> None:
    plan = plan_quotas(loads(_topology(3)))
    assert plan.xenstored_args() == []


def test_a_backend_of_64_guests_gets_its_own_larger_quotas() -> None:
    plan = plan_quotas(loads(_topology(64)))
    # the backend is domid 1; 128 devices: more than 128 watches and 1000 nodes
    watches = next(s for s in plan.domain_settings if s.startswith("1:watches="))
    assert int(watches.split("=")[1]) > 2 * 128
    assert any(s.startswith("1:nodes=") for s in plan.domain_settings)
    assert not any(s.startswith("2:") for s in plan.domain_settings)  # guests: defaults


def test_a_too_small_topology_quota_fails_naming_domain_quota_need_and_key() -> None:
    text = _topology(64, "[xenstore.quota.domain.backend]\nwatches = 128\n")
    with pytest.raises(QuotaError) as caught:
        plan_quotas(loads(text))
    message = str(caught.value)
    assert "\n" not in message
    assert "domain backend" in message and "quota watches is 128" in message
    assert "xenstore.quota.domain.backend.watches" in message
    text = _topology(64, "[xenstore.quota]\nwatches = 100\n")
    with pytest.raises(QuotaError, match=r"raise xenstore\.quota\.watches"):
        plan_quotas(loads(text))


def test_a_large_enough_topology_quota_is_passed_on() -> None:
    text = _topology(
        2, "[xenstore.quota]\nnodes = 5000\n[xenstore.quota.domain.g1]\nwatches = 77\n"
    )
    plan = plan_quotas(loads(text))
    assert plan.settings == ("nodes=5000",)
    assert plan.domain_settings == ("3:watches=77",)


@pytest.mark.parametrize(
    ("quota", "where"),
    [
        ("[xenstore.quota]\nwatch = 5\n", "xenstore.quota.watch"),
        ("[xenstore.quota]\nwatches = 0\n", "xenstore.quota.watches"),
        ("[xenstore.quota.domain.nobody]\nwatches = 5\n", "xenstore.quota.domain.nobody"),
    ],
)
def test_bad_quota_tables_name_the_key(quota: str, where: str) -> None:
    with pytest.raises(TopologyError) as caught:
        loads(_topology(1, quota))
    assert caught.value.where == where
