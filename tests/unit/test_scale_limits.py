"""Per-domain limits a backend of many guests needs (event channel ports here; quotas in
test_toolstack_quotas.py): the limit is the toolstack's choice, allocation stays cheap."""

from __future__ import annotations

from typing import cast

import pytest

from xenpv.hv.errors import HvError
from xenpv.hv.peerlinks import PeerLinks
from xenpv.hv.ports import MAX_PORTS, PortTable


def _table(max_ports: int = MAX_PORTS) -> PortTable:
    return PortTable(1, cast(PeerLinks, None), max_ports)  # alloc_unbound needs no link


def test_the_port_limit_is_the_domains_own() -> None:
    table = _table(max_ports=3)
    a, b = table.alloc_unbound(2), table.alloc_unbound(2)
    assert (a.port, b.port) == (1, 2)
    with pytest.raises(HvError, match="all 3 event channel ports in use"):
        table.alloc_unbound(2)
    table.close_port(a)
    assert table.alloc_unbound(3).port == 1  # the lowest free port again


def test_a_driver_domain_gets_more_than_the_2_level_abi() -> None:
    table = _table(max_ports=MAX_PORTS * 2)
    ports = [table.alloc_unbound(2).port for _ in range(MAX_PORTS + 10)]
    assert ports == list(range(1, MAX_PORTS + 11))
