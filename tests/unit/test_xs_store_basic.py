"""Basic store operations: read/write/mkdir/rm/directory, implicit creation, errors."""

from __future__ import annotations

from tests.unit.xs_helpers import Client, events, setup_guest_homes
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import XsType


def test_initial_tree() -> None:
    dom0 = Client(Store(), 0)
    assert dom0.ls("/") == ["tool"]
    assert dom0.ls("/tool") == ["xenstored"]
    assert dom0.get_perms("/") == ["n0"]
    assert dom0.read("/tool/xenstored") == b""


def test_write_read_and_implicit_parents() -> None:
    store = Store()
    dom0 = Client(store, 0)
    dom0.write("/a/b/c", b"v\0with nul")
    assert dom0.read("/a/b/c") == b"v\0with nul"
    assert dom0.read("/a/b") == b""
    assert dom0.ls("/a") == ["b"]
    assert store.get("/a/b/c") == b"v\0with nul"
    assert store.node_count() == 6


def test_children_in_insertion_order() -> None:
    dom0 = Client(Store(), 0)
    for name in ("zeta", "alpha", "mid"):
        dom0.write(f"/d/{name}", b"")
    assert dom0.ls("/d") == ["zeta", "alpha", "mid"]
    dom0.rm("/d/alpha")
    dom0.write("/d/alpha", b"")
    assert dom0.ls("/d") == ["zeta", "mid", "alpha"]


def test_empty_value_write() -> None:
    dom0 = Client(Store(), 0)
    dom0.write("/k", b"")
    assert dom0.read("/k") == b""


def test_mkdir_existing_is_ok_without_event() -> None:
    dom0 = Client(Store(), 0)
    dom0.write("/m", b"keep")
    dom0.watch("/m", "t")
    dom0.mkdir("/m")
    assert events(dom0.last, dom0.conn) == []
    assert dom0.read("/m") == b"keep"


def test_rm_rules() -> None:
    dom0 = Client(Store(), 0)
    dom0.write("/r/x/y", b"1")
    dom0.rm("/r/x")
    assert dom0.err(XsType.XS_READ, b"/r/x/y\0") == "ENOENT"
    assert dom0.ls("/r") == []
    dom0.rm("/r/missing")  # parent exists: OK
    assert dom0.err(XsType.XS_RM, b"/nothere/child\0") == "ENOENT"
    assert dom0.err(XsType.XS_RM, b"/\0") == "EINVAL"


def test_relative_paths() -> None:
    store = Store()
    dom0 = Client(store, 0)
    guest = Client(store, 3)
    setup_guest_homes(dom0, 3)
    guest.write("device/vbd", b"x")
    assert dom0.read("/local/domain/3/device/vbd") == b"x"
    assert guest.read("device/vbd") == b"x"
    assert guest.get_perms("device/vbd") == ["n3"]


def test_get_domain_path() -> None:
    guest = Client(Store(), 7)
    assert guest.ok(XsType.XS_GET_DOMAIN_PATH, b"12\0") == b"/local/domain/12\0"
    assert guest.err(XsType.XS_GET_DOMAIN_PATH, b"x\0") == "EINVAL"


def test_snapshot_round_trip() -> None:
    store = Store()
    dom0 = Client(store, 0)
    dom0.write("/a/b", b"1")
    dom0.set_perms("/a/b", "w2", "r3")
    restored = Store.restore(store.snapshot(), [])
    assert restored.state() == store.state()


def test_a_capture_is_the_state_when_taken_whatever_changes_after() -> None:
    """The server encodes a capture in a worker thread while requests keep changing the
    store: the snapshot must be the state at capture time, children order included."""
    store = Store()
    dom0 = Client(store, 0)
    dom0.write("/b", b"first")
    dom0.write("/a/x", b"1")
    dom0.write("/b/y", b"2")  # created after /a/x: creation order is not pre-order
    dom0.set_perms("/a/x", "w2", "r3")
    dom0.ok(XsType.XS_INTRODUCE, b"5\x0077\x008\x00")
    before = store.state()
    captured = store.capture()
    dom0.write("/b", b"changed")
    dom0.set_perms("/a/x", "n0")
    dom0.rm("/a")
    dom0.write("/c", b"new")
    dom0.ok(XsType.XS_RELEASE, b"5\x00")
    assert Store.restore(captured.encode(), []).state() == before
    assert before != store.state()


def test_shared_empty_child_dict_is_never_mutated() -> None:
    from xenpv.xenstore import tree

    store = Store()
    dom0 = Client(store, 0)
    for i in range(20):
        dom0.write(f"/leaf/{i % 3}/k{i}", b"")
    tx = dom0.start()
    dom0.write("/leaf/0/k0/deeper", b"", tx=tx)
    dom0.rm("/leaf/1", tx=tx)
    assert dom0.end(tx).payload == b"OK\0"
    assert tree._NO_CHILDREN == {}
    assert dom0.ok(XsType.XS_CONTROL, b"check\0") == b"OK\0"
