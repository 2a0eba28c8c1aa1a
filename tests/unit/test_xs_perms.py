"""Permissions: owner/default first entry, r/w/b/n, dom0, SET_TARGET, ENOENT vs EACCES."""

from __future__ import annotations

import pytest

from tests.unit.xs_helpers import Client, setup_guest_homes
from xenpv.xenstore.perms import Perm, parse_perms, perm_for
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import XsError, XsType

R, W = XsType.XS_READ, XsType.XS_WRITE


def test_perm_parsing() -> None:
    assert parse_perms(["w0", "r5", "b7", "n65535"]) == (
        Perm(2, 0),
        Perm(1, 5),
        Perm(3, 7),
        Perm(0, 65535),
    )
    for bad in ("", "r", "x1", "r-1", "r0x5", "r65536", "r01", "R1"):
        with pytest.raises(XsError) as exc:
            Perm.parse(bad)
        assert exc.value.errno_name == "EINVAL"
    assert [str(p) for p in parse_perms(["b3", "n0"])] == ["b3", "n0"]


@pytest.mark.parametrize(
    ("perms", "domid", "expect"),
    [
        (["n1"], 1, 11),  # owner: everything
        (["n1"], 2, 0),  # default none
        (["r1"], 2, 1),  # default read
        (["w1"], 2, 2),
        (["b1"], 2, 3),
        (["n1", "r2"], 2, 1),  # explicit entry wins over default
        (["b1", "n2"], 2, 0),
        (["n1", "r2", "w2"], 2, 1),  # first matching entry
        (["n1", "r3"], 2, 0),
        (["n5"], 0, 11),  # dom0 is privileged
    ],
)
def test_perm_for_matrix(perms: list[str], domid: int, expect: int) -> None:
    assert perm_for(parse_perms(perms), domid, domid == 0, None) == expect


def test_target_gets_target_domains_rights() -> None:
    assert perm_for(parse_perms(["n5"]), 3, False, 5) == 11
    assert perm_for(parse_perms(["n1", "r5"]), 3, False, 5) == 1


def _world() -> tuple[Store, Client, Client, Client]:
    store = Store()
    dom0, g1, g2 = Client(store, 0), Client(store, 1), Client(store, 2)
    setup_guest_homes(dom0, 1, 2)
    return store, dom0, g1, g2


def test_read_write_matrix_through_requests() -> None:
    _, dom0, g1, g2 = _world()
    dom0.write("/shared/ro", b"r")
    dom0.set_perms("/shared/ro", "n0", "r1")
    dom0.write("/shared/rw", b"w")
    dom0.set_perms("/shared/rw", "n0", "b1", "r2")
    assert g1.read("/shared/ro") == b"r"
    assert g1.err(W, b"/shared/ro\0x") == "EACCES"
    g1.write("/shared/rw", b"mine")
    assert g2.read("/shared/rw") == b"mine"
    assert g2.err(W, b"/shared/rw\0x") == "EACCES"
    assert g2.err(R, b"/shared/ro\0") == "EACCES"


def test_enoent_only_when_nearest_ancestor_is_accessible() -> None:
    _, dom0, g1, g2 = _world()
    assert g1.err(R, b"/local/domain/1/nope/deeper\0") == "ENOENT"
    assert g2.err(R, b"/local/domain/1/nope\0") == "EACCES"  # cannot read /local/domain/1
    assert g1.err(R, b"/nothing\0") == "EACCES"  # / is n0
    dom0.set_perms("/local/domain/1", "n1", "r2")
    assert g2.err(R, b"/local/domain/1/nope\0") == "ENOENT"
    # Creating needs write access to the nearest existing ancestor.
    assert g2.err(W, b"/local/domain/1/new\0v") == "EACCES"


def test_created_nodes_inherit_parent_perms_and_guest_owns_them() -> None:
    _, dom0, g1, _ = _world()
    dom0.set_perms("/local/domain/1", "n1", "r0", "r2")
    g1.write("a/b/c", b"1")
    assert g1.get_perms("a") == ["n1", "r0", "r2"]
    assert g1.get_perms("a/b/c") == ["n1", "r0", "r2"]
    dom0.mkdir("/local/domain/1/by-dom0")
    assert dom0.get_perms("/local/domain/1/by-dom0") == ["n1", "r0", "r2"]
    # A guest writing where someone granted it write access becomes owner of new nodes.
    dom0.write("/pub", b"")
    dom0.set_perms("/pub", "n0", "w1")
    g1.write("/pub/x/y", b"")
    assert dom0.get_perms("/pub/x/y") == ["n1", "w1"]


def test_set_perms_rules() -> None:
    _, dom0, g1, g2 = _world()
    g1.write("k", b"")
    g1.set_perms("k", "n1", "r2")
    assert g2.read("/local/domain/1/k") == b""
    sp = XsType.XS_SET_PERMS
    assert g1.err(sp, b"k\0n2\0") == "EPERM"  # guest cannot give a node away
    assert g2.err(sp, b"/local/domain/1/k\0n1\0b2\0") == "EACCES"  # not the owner
    dom0.set_perms("/local/domain/1/k", "n2")  # dom0 may change the owner
    assert g2.get_perms("/local/domain/1/k") == ["n2"]
    assert g1.err(sp, b"k\0") == "EINVAL"
    assert g1.err(sp, b"x\0q1\0") == "EINVAL"
    assert g1.err(sp, b"missing\0n1\0") == "ENOENT"


def test_write_access_alone_does_not_allow_set_perms() -> None:
    _, dom0, g1, _g2 = _world()
    dom0.write("/w", b"")
    dom0.set_perms("/w", "n0", "b1")
    g1.write("/w", b"allowed")
    assert g1.err(XsType.XS_SET_PERMS, b"/w\0n0\0b1\0b2\0") == "EACCES"


def test_set_target_grants_target_rights() -> None:
    store, dom0, g1, _ = _world()
    dm = Client(store, 5)
    assert dm.err(R, b"/local/domain/1\0") == "EACCES"
    for d in (1, 5):
        dom0.ok(XsType.XS_INTRODUCE, f"{d}\0{d}\0{d}\0".encode())
    dom0.ok(XsType.XS_SET_TARGET, b"5\x001\0")
    g1.write("secret", b"s")
    assert dm.read("/local/domain/1/secret") == b"s"
    dm.write("/local/domain/1/from-dm", b"x")
    assert dm.err(R, b"/tool\0") == "EACCES"


def test_special_node_perms() -> None:
    store, dom0, g1, _ = _world()
    gp, sp = XsType.XS_GET_PERMS, XsType.XS_SET_PERMS
    assert dom0.get_perms("@releaseDomain") == ["n0"]
    assert g1.err(gp, b"@releaseDomain\0") == "EACCES"
    assert g1.err(sp, b"@releaseDomain\0r1\0") == "EACCES"
    dom0.set_perms("@releaseDomain", "n0", "r1")
    assert g1.get_perms("@releaseDomain") == ["n0", "r1"]
    assert dom0.err(gp, b"@other\0") == "EINVAL"
    assert dom0.err(sp, b"@other\0n0\0") == "EINVAL"
    assert store.state()["special"]["@releaseDomain"] == ["n0", "r1"]
