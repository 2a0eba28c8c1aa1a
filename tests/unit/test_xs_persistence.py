"""Snapshot / restore / apply: replaying journalled changes gives back the acknowledged state."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenstore.changes import Change, ChangeFormatError
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import Message, XsType

T = XsType
PATHS = ["/a", "/a/b", "/a/b/c", "/a/d", "/e", "/local/domain/1/x", "x", "x/y"]

requests = st.one_of(
    st.tuples(st.just(T.XS_WRITE), st.sampled_from(PATHS), st.binary(max_size=8)).map(
        lambda t: (t[0], t[1].encode() + b"\0" + t[2])
    ),
    st.tuples(st.sampled_from([T.XS_MKDIR, T.XS_RM, T.XS_READ]), st.sampled_from(PATHS)).map(
        lambda t: (t[0], t[1].encode() + b"\0")
    ),
    st.tuples(
        st.just(T.XS_SET_PERMS),
        st.sampled_from(PATHS),
        st.lists(st.sampled_from(["n0", "r1", "b1", "w2", "n1"]), min_size=1, max_size=3),
    ).map(lambda t: (t[0], b"".join(s.encode() + b"\0" for s in (t[1], *t[2])))),
    st.tuples(
        st.sampled_from([T.XS_INTRODUCE, T.XS_RELEASE, T.XS_SET_TARGET]),
        st.sampled_from([b"1\x005\x003\0", b"2\x005\x004\0", b"1\0", b"2\0", b"1\x002\0"]),
    ),
    st.just((T.XS_TRANSACTION_START, b"\0")),
    st.sampled_from([(T.XS_TRANSACTION_END, b"T\0"), (T.XS_TRANSACTION_END, b"F\0")]),
)
steps = st.lists(st.tuples(st.integers(0, 2), requests, st.booleans()), min_size=1, max_size=40)


def _wire_round_trip(change: Change) -> Change:
    packed = msgpack.packb(change.to_wire(), use_bin_type=True)
    return Change.from_wire(msgpack.unpackb(packed, raw=False))


@given(steps, st.integers(0, 40))
@settings(max_examples=150, deadline=None)
def test_restore_equals_live_store(
    plan: list[tuple[int, tuple[int, bytes], bool]], cut: int
) -> None:
    store = Store()
    conns = [store.connect(d) for d in (0, 1, 0)]
    open_tx: dict[int, int] = {}
    snapshot_at_cut = store.snapshot() if cut == 0 else None
    before_cut: list[Change] = []
    after_cut: list[Change] = []
    for i, (who, (mtype, payload), in_tx) in enumerate(plan, start=1):
        conn = conns[who]
        tx = open_tx.get(conn, 0) if in_tx or mtype == T.XS_TRANSACTION_END else 0
        out = store.handle(conn, Message(mtype, i, tx, payload))
        reply = next(m for c, m in out.replies if c == conn and m.type != T.XS_WATCH_EVENT)
        if mtype == T.XS_TRANSACTION_START and reply.type == mtype:
            open_tx[conn] = int(reply.payload[:-1])
        if mtype == T.XS_TRANSACTION_END:
            open_tx.pop(conn, None)
        if reply.type == T.XS_ERROR or mtype == T.XS_READ:
            assert out.changes == []
        changes = [_wire_round_trip(c) for c in out.changes]
        (after_cut if snapshot_at_cut is not None else before_cut).extend(changes)
        if i == cut:
            snapshot_at_cut = store.snapshot()
    live = store.state()
    assert Store.restore(store.snapshot(), []).state() == live
    assert Store.restore(None, before_cut + after_cut).state() == live
    if snapshot_at_cut is not None:
        assert Store.restore(snapshot_at_cut, after_cut).state() == live


def test_reads_and_errors_produce_no_changes() -> None:
    store = Store()
    conn = store.connect(1)
    for msg in (
        Message(T.XS_READ, 1, 0, b"/\0"),
        Message(T.XS_WRITE, 2, 0, b"/forbidden\0x"),
        Message(T.XS_DIRECTORY, 3, 0, b"/\0"),
    ):
        assert store.handle(conn, msg).changes == []


def test_one_change_per_request() -> None:
    store = Store()
    conn = store.connect(0)
    out = store.handle(conn, Message(T.XS_WRITE, 1, 0, b"/a/b/c/d\0v"))
    assert len(out.changes) == 1
    assert [op[0] for op in out.changes[0].ops] == ["c", "g", "c", "g", "c", "g", "c", "g"]


def test_apply_on_live_store() -> None:
    a, b = Store(), Store()
    ca = a.connect(0)
    for i, payload in enumerate([b"/x\0" + b"1", b"/x/y\0" + b"2"]):
        for change in a.handle(ca, Message(T.XS_WRITE, i, 0, payload)).changes:
            b.apply(change)
    assert a.state() == b.state()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"g": 1},
        {"g": "x", "o": []},
        {"g": 1, "o": [["zz"]]},
        {"g": 1, "o": [["c", "/a"]]},
    ],
)
def test_malformed_change_records(bad: object) -> None:
    with pytest.raises(ChangeFormatError):
        Change.from_wire(bad)


def test_inconsistent_change_is_refused() -> None:
    store = Store()
    with pytest.raises(ChangeFormatError):
        store.apply(Change([["c", "/no/parent", b"", ["n0"], 5]], 6))
    with pytest.raises(ChangeFormatError):
        store.apply(Change([["d", "/"]], 6))
    with pytest.raises(ChangeFormatError):
        store.apply(Change([["u", "/missing", b"", ["n0"], 5]], 6))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00\x01garbage",
        msgpack.packb({"v": 99}),
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 1, "g": 1, "n": [["/a", b"", ["n0"], 0]], "d": [], "t": [], "s": {}}),
        msgpack.packb(
            {"v": 1, "g": 1, "n": [["/", b"", ["n0"], 0]] * 2, "d": [], "t": [], "s": {}}
        ),
    ],
)
def test_corrupt_snapshot(blob: bytes) -> None:
    with pytest.raises(ChangeFormatError):
        Store.restore(blob, [])


def test_generations_survive_restore() -> None:
    store = Store()
    conn = store.connect(0)
    store.handle(conn, Message(T.XS_WRITE, 1, 0, b"/g/x\0"))
    before = store.handle(conn, Message(T.XS_DIRECTORY_PART, 2, 0, b"/g\x000\0")).replies
    restored = Store.restore(store.snapshot(), [])
    conn2 = restored.connect(0)
    after = restored.handle(conn2, Message(T.XS_DIRECTORY_PART, 2, 0, b"/g\x000\0")).replies
    assert before[0][1] == after[0][1]
    # New generations after a restore never reuse old ones.
    restored.handle(conn2, Message(T.XS_WRITE, 3, 0, b"/g/y\0"))
    newer = restored.handle(conn2, Message(T.XS_DIRECTORY_PART, 2, 0, b"/g\x000\0")).replies
    assert int(newer[0][1].payload.split(b"\0")[0]) > int(after[0][1].payload.split(b"\0")[0])
