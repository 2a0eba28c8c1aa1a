"""Transactions: ids, isolation, C ≥ 4.9 conflict model, events and journal at commit."""

from __future__ import annotations

from tests.unit.xs_helpers import Client, dom0_pair, events, setup_guest_homes
from xenpv.xenstore.quotas import Quotas
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import XsType, error_name

R, W, END = XsType.XS_READ, XsType.XS_WRITE, XsType.XS_TRANSACTION_END


def test_ids_start_at_one_per_connection() -> None:
    a, b = dom0_pair()
    assert [a.start(), a.start(), b.start()] == [1, 2, 1]
    assert a.end(1).payload == b"OK\0"
    assert a.start() == 3


def test_own_writes_visible_others_isolated() -> None:
    a, b = dom0_pair()
    a.write("/k", b"old")
    tx = a.start()
    a.write("/k", b"new", tx=tx)
    a.write("/fresh/n", b"1", tx=tx)
    assert a.read("/k", tx=tx) == b"new"
    assert a.ls("/fresh", tx=tx) == ["n"]
    assert b.read("/k") == b"old"
    assert a.read("/k") == b"old"  # the same connection outside the transaction
    assert b.err(R, b"/fresh\0") == "ENOENT"
    assert a.end(tx).payload == b"OK\0"
    assert b.read("/k") == b"new" and b.read("/fresh/n") == b"1"


def test_conflict_on_read_node() -> None:
    a, b = dom0_pair()
    a.write("/x", b"1")
    tx = a.start()
    a.read("/x", tx=tx)
    b.write("/x", b"2")
    a.write("/y", b"derived", tx=tx)
    reply = a.end(tx)
    assert error_name(reply) == "EAGAIN"
    assert b.err(R, b"/y\0") == "ENOENT"
    assert a.err(END, b"T\0", tx=tx) == "ENOENT"  # gone after END in every case


def test_unrelated_write_is_no_conflict() -> None:
    a, b = dom0_pair()
    a.write("/x", b"1")
    a.write("/other", b"1")
    tx = a.start()
    a.read("/x", tx=tx)
    b.write("/other", b"2")
    a.write("/x", b"3", tx=tx)
    assert a.end(tx).payload == b"OK\0"


def test_write_after_start_but_before_first_read_is_no_conflict() -> None:
    # C ≥ 4.9 compares with the generation seen at first access, not at start.
    a, b = dom0_pair()
    a.write("/x", b"1")
    tx = a.start()
    b.write("/x", b"2")
    assert a.read("/x", tx=tx) == b"2"
    assert a.end(tx).payload == b"OK\0"


def test_repeatable_read_then_conflict() -> None:
    a, b = dom0_pair()
    a.write("/d/one", b"")
    tx = a.start()
    assert a.ls("/d", tx=tx) == ["one"]
    b.write("/d/two", b"")  # adds a child: /d gets a new generation
    assert a.ls("/d", tx=tx) == ["one"]
    assert error_name(a.end(tx)) == "EAGAIN"


def test_concurrent_creation_conflicts_via_missing_node() -> None:
    a, b = dom0_pair()
    tx = a.start()
    assert a.err(R, b"/new\0", tx=tx) == "ENOENT"
    b.write("/new", b"b")
    a.write("/somewhere", b"", tx=tx)
    assert error_name(a.end(tx)) == "EAGAIN"


def test_implicit_reads_count() -> None:
    # Writing /p/q/r inside the transaction reads /p (missing) and / (its parent).
    a, b = dom0_pair()
    tx = a.start()
    a.write("/p/q/r", b"", tx=tx)
    b.write("/zzz", b"")  # rewrites / (new child): / was read implicitly
    assert error_name(a.end(tx)) == "EAGAIN"


def _watched_write() -> tuple[Client, Client, int]:
    """`a` has written /t/a in transaction `tx` (not yet ended) while `w` watches /t."""
    a, w = dom0_pair()
    w.watch("/t", "tok")
    tx = a.start()
    a.write("/t/a", b"1", tx=tx)
    return a, w, tx


def test_events_and_journal_only_at_commit() -> None:
    a, w, tx = _watched_write()
    assert events(a.last, w.conn) == [] and a.last is not None and a.last.changes == []
    a.rm("/t/a", tx=tx)
    a.write("/t/b", b"2", tx=tx)
    reply = a.end(tx)
    assert reply.payload == b"OK\0"
    assert events(a.last, w.conn) == [("/t/a", "tok"), ("/t/a", "tok"), ("/t/b", "tok")]
    assert a.last is not None and len(a.last.changes) == 1
    restored = Store.restore(None, a.last.changes)
    assert restored.get("/t/b") == b"2" and restored.get("/t/a") is None


def test_abort_discards() -> None:
    a, w, tx = _watched_write()
    assert a.end(tx, commit=False).payload == b"OK\0"
    assert events(a.last, w.conn) == [] and a.last is not None and a.last.changes == []
    assert a.store.get("/t/a") is None


def test_end_errors() -> None:
    store = Store()
    a = Client(store, 0)
    assert a.err(END, b"T\0") == "ENOENT"  # no transaction
    assert a.err(END, b"T\0", tx=5) == "ENOENT"  # unknown id
    tx = a.start()
    assert a.err(END, b"X\0", tx=tx) == "EINVAL"
    assert a.err(END, b"T", tx=tx) == "EINVAL"
    assert a.end(tx).payload == b"OK\0"  # still open after EINVAL


def test_nested_start_is_ebusy_and_unknown_id_enoent() -> None:
    store = Store()
    a = Client(store, 0)
    tx = a.start()
    assert a.err(XsType.XS_TRANSACTION_START, b"\0", tx=tx) == "EBUSY"
    assert a.err(R, b"/\0", tx=tx + 10) == "ENOENT"


def test_transaction_of_other_connection_is_unknown() -> None:
    a, b = dom0_pair()
    tx = a.start()
    b.start()
    assert b.err(R, b"/nope\0", tx=tx + 1) == "ENOENT"


def test_disconnect_drops_transactions() -> None:
    store = Store()
    a = Client(store, 3)
    a.start()
    store.disconnect(a.conn)
    b = Client(store, 3)
    for _ in range(10):  # the quota was freed
        b.start()


def test_transaction_quota() -> None:
    store = Store(Quotas(transactions_per_domain=2))
    dom0, g1 = Client(store, 0), Client(store, 1)
    g1b = Client(store, 1)
    g1.start()
    g1b.start()
    assert g1.err(XsType.XS_TRANSACTION_START, b"\0") == "ENOSPC"
    for _ in range(5):
        dom0.start()


def test_touched_nodes_quota() -> None:
    store = Store(Quotas(transaction_nodes=5))
    dom0, g1 = Client(store, 0), Client(store, 1)
    setup_guest_homes(dom0, 1)
    for i in range(8):
        g1.write(f"n{i}", b"")
    tx = g1.start()
    for i in range(5):
        g1.read(f"n{i}", tx=tx)
    assert g1.err(R, b"n6\0", tx=tx) == "ENOSPC"
    g1.read("n0", tx=tx)  # already touched
    assert g1.end(tx).payload == b"OK\0"


def test_node_quota_at_commit_without_conflict() -> None:
    store = Store(Quotas(nodes_per_domain=3))
    dom0, g1 = Client(store, 0), Client(store, 1)
    g1b = Client(store, 1)
    setup_guest_homes(dom0, 1)
    dom0.write("/pub", b"")
    dom0.set_perms("/pub", "n0", "w1")
    tx = g1.start()
    g1.write("a", b"", tx=tx)
    g1.write("b", b"", tx=tx)
    g1b.write("/pub/x", b"")  # another subtree: no conflict, but the domain now owns 2 nodes
    assert error_name(g1.end(tx)) == "ENOSPC"
    assert store.get("/local/domain/1/a") is None


def test_rm_in_transaction_reads_the_subtree() -> None:
    store = Store()
    a, b = Client(store, 0), Client(store, 0)
    a.write("/s/deep/leaf", b"1")
    tx = a.start()
    a.rm("/s", tx=tx)
    assert a.err(R, b"/s/deep\0", tx=tx) == "ENOENT"
    b.write("/s/deep/leaf", b"2")
    assert error_name(a.end(tx)) == "EAGAIN"
    assert store.get("/s/deep/leaf") == b"2"


def test_set_perms_in_transaction() -> None:
    store = Store()
    a = Client(store, 0)
    a.write("/p", b"")
    tx = a.start()
    a.set_perms("/p", "n0", "r4", tx=tx)
    assert a.get_perms("/p", tx=tx) == ["n0", "r4"]
    assert a.get_perms("/p") == ["n0"]
    assert a.end(tx).payload == b"OK\0"
    assert a.get_perms("/p") == ["n0", "r4"]


def test_directory_part_generation_changes() -> None:
    store = Store()
    a = Client(store, 0)
    a.write("/g/x", b"")
    first = a.ok(XsType.XS_DIRECTORY_PART, b"/g\x000\0")
    a.write("/g/y", b"")
    second = a.ok(XsType.XS_DIRECTORY_PART, b"/g\x000\0")
    assert first.split(b"\0")[0] != second.split(b"\0")[0]
    a.write("/g/x", b"value only")  # children unchanged, but the generation is per node
    third = a.ok(XsType.XS_DIRECTORY_PART, b"/g\x000\0")
    assert third == second


def test_stale_view_rm_with_parent_seen_missing() -> None:
    a, b = dom0_pair()
    tx = a.start()
    assert a.err(R, b"/p\0", tx=tx) == "ENOENT"  # /p seen missing
    b.write("/p/c", b"")
    assert a.err(XsType.XS_RM, b"/p/c\0", tx=tx) == "EAGAIN"  # /p/c read fresh: exists
    assert error_name(a.end(tx)) == "EAGAIN"


def test_stale_view_rm_with_listed_child_gone() -> None:
    a, b = dom0_pair()
    a.write("/q/c", b"")
    tx = a.start()
    assert a.ls("/q", tx=tx) == ["c"]
    b.rm("/q/c")
    assert a.err(XsType.XS_RM, b"/q\0", tx=tx) == "EAGAIN"
    assert error_name(a.end(tx)) == "EAGAIN"


def test_stale_view_rm_of_child_unknown_to_parent_snapshot() -> None:
    a, b = dom0_pair()
    a.write("/u", b"")
    tx = a.start()
    assert a.ls("/u", tx=tx) == []  # /u snapshot: no children
    b.write("/u/c", b"")
    assert a.read("/u/c", tx=tx) == b""  # read fresh: exists
    assert a.err(XsType.XS_RM, b"/u/c\0", tx=tx) == "EAGAIN"
    assert a.ls("/u", tx=tx) == []
    assert error_name(a.end(tx)) == "EAGAIN"
