"""Quotas (C defaults, unprivileged only) with their errno."""

from __future__ import annotations

import pytest

from tests.unit.xs_helpers import Client, setup_guest_homes
from xenpv.xenstore.quotas import Quotas, build_quotas
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import XsType

W, SP = XsType.XS_WRITE, XsType.XS_SET_PERMS


def test_c_defaults() -> None:
    q = Quotas()
    assert (q.nodes_per_domain, q.node_size, q.watches_per_domain) == (1000, 2048, 128)
    assert (q.transactions_per_domain, q.perms_per_node, q.transaction_nodes) == (10, 5, 1024)


def _guest(quotas: Quotas) -> tuple[Store, Client, Client]:
    store = Store(quotas)
    dom0, g1 = Client(store, 0), Client(store, 1)
    setup_guest_homes(dom0, 1)
    return store, dom0, g1


def test_nodes_per_domain() -> None:
    store, dom0, g1 = _guest(Quotas(nodes_per_domain=4))
    g1.write("a", b"")  # the home directory counts: 2 nodes
    assert g1.err(W, b"b/c/d\0") == "ENOSPC"  # would need 3 more
    assert store.get("/local/domain/1/b") is None  # nothing half-created
    g1.write("b/c", b"")
    assert g1.err(W, b"e\0") == "ENOSPC"
    g1.write("a", b"rewrite existing is fine")
    g1.rm("b")
    g1.write("e", b"")
    for i in range(10):
        dom0.write(f"/local/domain/1/dom0-{i}", b"")  # dom0 is not limited (nodes owned by 1)


def test_default_node_quota_is_1000() -> None:
    _store, _dom0, g1 = _guest(Quotas())
    # The home directory, 25 directories and 974 leaves (one flat directory of 999 would hit
    # the node size quota first: child names count).
    created = 1
    for i in range(999):
        g1.write(f"d{i % 25}/k{i // 25}", b"")
        created += 2 if i < 25 else 1
        if created == 1000:
            break
    assert g1.err(W, b"one-more\0") == "ENOSPC"
    assert g1.err(W, b"d0/one-more\0") == "ENOSPC"


def test_node_size_counts_value_perms_and_children() -> None:
    _store, dom0, g1 = _guest(Quotas(node_size=100))
    # 24 header + 8 per permission + value + child names with NULs.
    g1.write("v", b"x" * 68)  # 24 + 8 + 68 = 100
    assert g1.err(W, b"v\0" + b"x" * 69) == "ENOSPC"
    assert g1.read("v") == b"x" * 68
    assert g1.err(SP, b"v\0n1\0r2\0") == "ENOSPC"
    g1.write("v", b"x" * 60)
    g1.set_perms("v", "n1", "r2")
    assert g1.err(SP, b"v\0n1\0r2\0r3\0") == "ENOSPC"
    # A parent whose child list would outgrow the limit refuses the new child.
    g1.write("d/" + "c" * 60, b"")  # d: 24 + 8 + 61 = 93
    assert g1.err(W, b"d/abcdefgh\0") == "ENOSPC"
    dom0.write("/local/domain/1/v", b"y" * 3000)  # dom0 is not limited


def test_default_node_size() -> None:
    _store, _dom0, g1 = _guest(Quotas())
    g1.write("big", b"x" * (2048 - 32))
    assert g1.err(W, b"big\0" + b"x" * (2048 - 31)) == "ENOSPC"


def test_perms_per_node() -> None:
    _store, dom0, g1 = _guest(Quotas())
    g1.write("p", b"")
    g1.set_perms("p", "n1", "r2", "r3", "r4", "r5")
    assert g1.err(SP, b"p\0n1\0r2\0r3\0r4\0r5\0r6\0") == "ENOSPC"
    dom0.set_perms("/local/domain/1/p", "n1", *[f"r{d}" for d in range(2, 12)])


def test_per_domain_quota_replaces_the_global_one_for_that_domain_only() -> None:
    quotas = build_quotas(Quotas(), ["nodes=4"], ["2:nodes=50"])
    store = Store(quotas)
    dom0, g1, g2 = Client(store, 0), Client(store, 1), Client(store, 2)
    setup_guest_homes(dom0, 1)
    setup_guest_homes(dom0, 2)
    g1.write("a", b"")
    assert g1.err(W, b"b/c/d\0") == "ENOSPC"  # the global 4
    g2.write("b/c/d/e/f", b"")  # its own 50


def test_quota_settings_use_c_names_and_fail_in_one_line() -> None:
    quotas = build_quotas(Quotas(), ["watches=300", "transactions=20"], [])
    assert (quotas.watches_per_domain, quotas.transactions_per_domain) == (300, 20)
    for bad in ("watch=3", "watches", "watches=0", "watches=x"):
        with pytest.raises(ValueError, match="watch"):
            build_quotas(Quotas(), [bad], [])
    with pytest.raises(ValueError, match="DOMID:NAME=N"):
        build_quotas(Quotas(), [], ["x:watches=3"])
