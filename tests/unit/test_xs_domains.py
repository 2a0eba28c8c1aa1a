"""Domain requests: INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED, RESUME, SET_TARGET, CONTROL."""

from __future__ import annotations

import pytest

from tests.unit.xs_helpers import Client, events
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import XsType

INTRO, REL, ISI = XsType.XS_INTRODUCE, XsType.XS_RELEASE, XsType.XS_IS_DOMAIN_INTRODUCED


@pytest.mark.parametrize(
    "mtype",
    [INTRO, REL, ISI, XsType.XS_RESUME, XsType.XS_SET_TARGET, XsType.XS_CONTROL],
)
def test_privileged_requests_refused_to_guests(mtype: int) -> None:
    guest = Client(Store(), 4)
    assert guest.err(mtype, b"4\0") == "EACCES"


def test_introduce_and_is_introduced() -> None:
    store = Store()
    dom0 = Client(store, 0)
    assert dom0.ok(ISI, b"5\0") == b"F\0"
    assert dom0.ok(ISI, b"0\0") == b"T\0"
    assert dom0.ok(INTRO, b"5\x00100\x007\0") == b"OK\0"
    assert dom0.ok(ISI, b"5\0") == b"T\0"
    assert dom0.last is not None
    assert dom0.ok(INTRO, b"5\x00100\x008\0") == b"OK\0"  # same gfn: reconnect, port updated
    assert dom0.err(INTRO, b"5\x00101\x007\0") == "EINVAL"  # another gfn
    for bad in (
        b"0\x001\x001\0",
        b"32752\x001\x001\0",
        b"5\x001\0",
        b"x\x001\x001\0",
        b"6\x001\x000\0",
    ):
        assert dom0.err(INTRO, bad) == "EINVAL", bad
    assert store.state()["domains"] == {5: (100, 8)}


def test_release_fires_and_drops_connections() -> None:
    store = Store()
    dom0 = Client(store, 0)
    g5, g5b, g6 = Client(store, 5), Client(store, 5), Client(store, 6)
    g5.watch("/local", "t")
    dom0.watch("@releaseDomain", "rel")
    dom0.ok(INTRO, b"5\x001\x001\0")
    assert dom0.ok(REL, b"5\0") == b"OK\0"
    assert dom0.last is not None
    assert sorted(dom0.last.drop) == sorted([g5.conn, g5b.conn])
    assert events(dom0.last, dom0.conn) == [("@releaseDomain", "rel")]
    assert store.watch_count() == 1
    assert dom0.ok(ISI, b"5\0") == b"F\0"
    assert dom0.err(REL, b"5\0") == "ENOENT"
    assert dom0.err(REL, b"0\0") == "EINVAL"
    assert g6.conn not in dom0.last.drop


def test_resume() -> None:
    dom0 = Client(Store(), 0)
    assert dom0.err(XsType.XS_RESUME, b"3\0") == "ENOENT"
    dom0.ok(INTRO, b"3\x001\x001\0")
    assert dom0.ok(XsType.XS_RESUME, b"3\0") == b"OK\0"
    assert dom0.err(XsType.XS_RESUME, b"0\0") == "EINVAL"


def test_set_target_errors() -> None:
    store = Store()
    dom0 = Client(store, 0)
    st = XsType.XS_SET_TARGET
    assert dom0.err(st, b"5\0") == "EINVAL"
    assert dom0.err(st, b"5\x006\0") == "ENOENT"
    dom0.ok(INTRO, b"5\x001\x001\0")
    dom0.ok(INTRO, b"6\x001\x001\0")
    assert dom0.ok(st, b"5\x006\0") == b"OK\0"
    assert store.state()["targets"] == {5: 6}
    dom0.ok(REL, b"5\0")
    assert store.state()["targets"] == {}


def test_control() -> None:
    dom0 = Client(Store(), 0)
    c = XsType.XS_CONTROL
    assert dom0.ok(c, b"print\0hello\0") == b"OK\0"
    assert dom0.ok(c, b"check\0") == b"OK\0"
    assert b"print" in dom0.ok(c, b"help\0")
    assert dom0.err(c, b"live-update\0") == "EINVAL"
    assert dom0.err(c, b"") == "EINVAL"


def test_domain_changes_are_durable() -> None:
    store = Store()
    dom0 = Client(store, 0)
    changes = []
    for payload, mtype in (
        (b"5\x001\x002\0", INTRO),
        (b"6\x001\x002\0", INTRO),
        (b"5\x006\0", XsType.XS_SET_TARGET),
        (b"6\0", REL),
    ):
        dom0.ok(mtype, payload)
        assert dom0.last is not None
        changes += dom0.last.changes
    assert Store.restore(None, changes).state() == store.state()


def test_release_purges_the_domain_so_a_reused_domid_inherits_nothing() -> None:
    """XSA-322 / XSA-419: a released domain's nodes go, and so do its permission entries."""
    store = Store()
    dom0 = Client(store, 0)
    assert dom0.ok(INTRO, b"5\x00100\x007\0") == b"OK\0"
    dom0.write("/shared/secret", b"s")
    assert dom0.ok(XsType.XS_SET_PERMS, b"/shared/secret\0n0\0r5\0w6\0") == b"OK\0"
    dom0.write("/guest5/data/x", b"1")
    assert dom0.ok(XsType.XS_SET_PERMS, b"/guest5\0b5\0") == b"OK\0"  # owned by 5
    assert dom0.ok(XsType.XS_SET_PERMS, b"/guest5/data\0n5\0r6\0") == b"OK\0"
    assert dom0.ok(XsType.XS_SET_PERMS, b"@releaseDomain\0n0\0r5\0") == b"OK\0"
    dom0.ok(XsType.XS_WATCH, b"/guest5/data/x\0tok\0")
    guest5 = Client(store, 5)
    assert guest5.read("/shared/secret") == b"s"

    assert dom0.ok(REL, b"5\0") == b"OK\0"
    assert dom0.last is not None
    assert [e for e in events(dom0.last, dom0.conn) if e[1] == "tok"] == [("/guest5/data/x", "tok")]
    assert dom0.err(XsType.XS_READ, b"/guest5\0") == "ENOENT"
    assert dom0.ok(XsType.XS_GET_PERMS, b"/shared/secret\0") == b"n0\0w6\0"
    assert dom0.ok(XsType.XS_GET_PERMS, b"@releaseDomain\0") == b"n0\0"

    # a new domain 5 (same domid) sees none of the old one's access
    assert dom0.ok(INTRO, b"5\x00200\x009\0") == b"OK\0"
    reborn = Client(store, 5)
    assert reborn.err(XsType.XS_READ, b"/shared/secret\0") == "EACCES"


def test_release_gives_the_owner_role_of_a_kept_node_to_dom0() -> None:
    store = Store()
    dom0 = Client(store, 0)
    dom0.write("/top", b"")
    assert dom0.ok(XsType.XS_SET_PERMS, b"/\0r0\0r7\0") == b"OK\0"  # root: never removed
    assert dom0.ok(INTRO, b"7\x00100\x007\0") == b"OK\0"
    assert dom0.ok(REL, b"7\0") == b"OK\0"
    assert dom0.ok(XsType.XS_GET_PERMS, b"/\0") == b"r0\0"
    assert dom0.read("/top") == b""
