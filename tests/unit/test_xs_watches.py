"""Watches: initial event, subtree matching, relative paths, RM rules, permissions, quota."""

from __future__ import annotations

from tests.unit.xs_helpers import Client, dom0_pair, events, setup_guest_homes
from xenpv.xenstore.quotas import Quotas
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import Message, XsType

WATCH, UNWATCH = XsType.XS_WATCH, XsType.XS_UNWATCH


def _world(quotas: Quotas | None = None) -> tuple[Store, Client, Client, Client]:
    store = Store(quotas)
    dom0, g1, g2 = Client(store, 0), Client(store, 1), Client(store, 2)
    setup_guest_homes(dom0, 1, 2)
    return store, dom0, g1, g2


def test_initial_event_follows_the_reply() -> None:
    store = Store()
    dom0 = Client(store, 0)
    dom0.watch("/not/yet", "tok")
    assert dom0.last is not None
    kinds = [(c, m.type) for c, m in dom0.last.replies]
    assert kinds == [(dom0.conn, XsType.XS_WATCH), (dom0.conn, XsType.XS_WATCH_EVENT)]
    assert dom0.last.replies[1][1] == Message(XsType.XS_WATCH_EVENT, 0, 0, b"/not/yet\0tok\0")
    assert dom0.last.changes == []


def test_events_precede_the_reply_and_cover_the_subtree() -> None:
    dom0, other = dom0_pair()
    other.watch("/a", "sub")
    other.watch("/", "root")
    other.watch("/a/b/c/d", "below")
    dom0.write("/a/b/c", b"1")
    assert dom0.last is not None
    assert [c for c, _ in dom0.last.replies] == [other.conn, other.conn, dom0.conn]
    # Registration order on one connection.
    assert events(dom0.last, other.conn) == [("/a/b/c", "sub"), ("/a/b/c", "root")]


def test_write_fires_only_on_the_written_path_not_created_parents() -> None:
    dom0, w = dom0_pair()
    w.watch("/p", "t")
    dom0.write("/p/q/r", b"")
    assert events(dom0.last, w.conn) == [("/p/q/r", "t")]


def test_relative_watch_gets_relative_paths() -> None:
    store, dom0, g1, _ = _world()
    g1.watch("device", "dev")
    assert events(g1.last, g1.conn) == [("device", "dev")]
    dom0.write("/local/domain/1/device/vif/0", b"")
    assert events(dom0.last, g1.conn) == [("device/vif/0", "dev")]
    g1.watch("/local/domain/1/device", "abs")
    g1.write("device/x", b"")
    assert events(g1.last, g1.conn) == [("device/x", "dev"), ("/local/domain/1/device/x", "abs")]
    # Relative and absolute spellings name the same watch.
    assert g1.err(WATCH, b"/local/domain/1/device\0dev\0") == "EEXIST"
    g1.unwatch("/local/domain/1/device", "dev")
    g1.unwatch("device", "abs")
    assert store.watch_count() == 0


def test_duplicates_and_unknown_unwatch() -> None:
    _, dom0, _, _ = _world()
    dom0.watch("/a", "t")
    assert dom0.err(WATCH, b"/a\0t\0") == "EEXIST"
    dom0.watch("/a", "t2")  # same path, other token: fine
    assert dom0.err(UNWATCH, b"/a\0nope\0") == "ENOENT"
    assert dom0.err(WATCH, b"/a\0") == "EINVAL"
    assert dom0.err(WATCH, b"/a\0t\0extra\0") == "EINVAL"
    assert dom0.err(WATCH, b"/a/\0t\0") == "EINVAL"
    assert dom0.err(UNWATCH, b"//a\0t\0") == "EINVAL"


def test_watches_are_per_connection() -> None:
    store = Store()
    a, b = Client(store, 0), Client(store, 0)
    a.watch("/x", "t")
    b.watch("/x", "t")  # not a duplicate: another connection
    a.write("/x", b"1")
    assert events(a.last, a.conn) == [("/x", "t")]
    assert events(a.last, b.conn) == [("/x", "t")]
    store.disconnect(b.conn)
    a.write("/x", b"2")
    assert events(a.last, b.conn) == []
    assert store.watch_count() == 1


def test_rm_subtree_rules() -> None:
    dom0, w = dom0_pair()
    for path in ("/t/a/x", "/t/a/y/z", "/t/b"):
        dom0.write(path, b"")
    w.watch("/", "root")
    w.watch("/t", "top")
    w.watch("/t/a", "removed")
    w.watch("/t/a/y/z", "leaf")
    w.watch("/t/a/y", "mid")
    w.watch("/t/b", "sibling")
    dom0.rm("/t/a")
    # Exact events for descendants (children first), then the removed root for watches on it
    # and above it.
    assert events(dom0.last, w.conn) == [
        ("/t/a/y/z", "leaf"),
        ("/t/a/y", "mid"),
        ("/t/a", "root"),
        ("/t/a", "top"),
        ("/t/a", "removed"),
    ]
    dom0.rm("/t/a")  # gone already, parent exists
    assert events(dom0.last, w.conn) == []


def test_event_needs_read_permission_on_node_or_parent() -> None:
    _store, _dom0, g1, g2 = _world()
    g2.watch("/local/domain/1", "peek")
    g1.write("private", b"x")  # n1 inherited: g2 reads neither node nor parent
    assert events(g1.last, g2.conn) == []
    g1.set_perms("/local/domain/1", "n1", "r2")
    assert events(g1.last, g2.conn) == [("/local/domain/1", "peek")]
    g1.write("private", b"y")  # node unreadable, parent readable
    assert events(g1.last, g2.conn) == [("/local/domain/1/private", "peek")]


def test_set_perms_event_reaches_watchers_losing_access() -> None:
    _store, _dom0, g1, g2 = _world()
    g1.write("k", b"")
    g1.set_perms("k", "n1", "r2")
    g2.watch("/local/domain/1/k", "w")
    g1.set_perms("k", "n1")  # g2 loses read access but still hears about it
    assert events(g1.last, g2.conn) == [("/local/domain/1/k", "w")]
    g1.write("k", b"again")
    assert events(g1.last, g2.conn) == []


def test_special_watches() -> None:
    _store, dom0, g1, _ = _world()
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "rel")
    dom0.watch("/", "all")
    g1.watch("@releaseDomain", "g1rel")
    dom0.ok(XsType.XS_INTRODUCE, b"7\x0012\x003\0")
    assert events(dom0.last, dom0.conn) == [("@introduceDomain", "intro")]
    dom0.ok(XsType.XS_RELEASE, b"7\0")
    assert events(dom0.last, dom0.conn) == [("@releaseDomain", "rel")]
    assert events(dom0.last, g1.conn) == []  # n0 special node
    dom0.set_perms("@releaseDomain", "n0", "r1")
    dom0.ok(XsType.XS_INTRODUCE, b"7\x0012\x003\0")
    dom0.ok(XsType.XS_RELEASE, b"7\0")
    assert events(dom0.last, g1.conn) == [("@releaseDomain", "g1rel")]


def test_watch_quota_applies_to_guests_per_domain() -> None:
    store, dom0, g1, _ = _world(Quotas(watches_per_domain=2))
    g1b = Client(store, 1)
    g1.watch("a", "1")
    g1b.watch("a", "2")
    assert g1.err(WATCH, b"a\x003\0") == "E2BIG"
    for i in range(5):
        dom0.watch("/x", str(i))  # dom0 is not limited
    g1.unwatch("a", "1")
    g1.watch("a", "3")


def test_overlong_events_are_not_sent() -> None:
    store = Store()
    dom0 = Client(store, 0)
    long_token = "t" * 3000
    path = "/" + "p" * 1100
    dom0.watch(path, long_token)
    assert events(dom0.last, dom0.conn) == []  # initial event would exceed 4096 bytes
    dom0.write(path, b"")
    assert events(dom0.last, dom0.conn) == []


def test_reset_watches_drops_watches_and_transactions() -> None:
    store = Store()
    dom0 = Client(store, 0)
    dom0.watch("/a", "t")
    tx = dom0.start()
    assert dom0.ok(XsType.XS_RESET_WATCHES, b"") == b"OK\0"
    assert store.watch_count() == 0
    assert dom0.err(XsType.XS_READ, b"/\0", tx=tx) == "ENOENT"
    dom0.write("/a", b"")
    assert events(dom0.last, dom0.conn) == []


def test_watch_ignores_transaction_id() -> None:
    store = Store()
    dom0 = Client(store, 0)
    assert dom0.ok(WATCH, b"/a\0t\0", tx=77) == b"OK\0"


def test_many_watches_do_not_all_get_scanned() -> None:
    dom0, w = dom0_pair()
    for i in range(2000):
        w.watch(f"/many/{i}", "t")
    dom0.write("/many/5/x", b"")
    assert events(dom0.last, w.conn) == [("/many/5/x", "t")]
    dom0.rm("/many")
    assert events(dom0.last, w.conn) == [("/many/5", "t")]
