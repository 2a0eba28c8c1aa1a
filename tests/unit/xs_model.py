"""A small reference model of xenstore semantics and a Hypothesis state machine using it.

The model is deliberately naive (plain dicts, deep copies, linear scans) so that it can be
checked by reading it against Xen's docs/misc/xenstore.txt and C xenstored. The system under test is
pluggable: anything with the `Driver` shape. `StoreDriver` drives the sans-IO `Store`; a
socket driver for the real server only has to implement the same three methods:

- `connect(domid) -> handle`;
- `request(handle, msg) -> list[Message]`: every message this connection receives because
  of `msg`, in order, up to and including the reply *and* the initial event of a WATCH;
- `drain(handle) -> list[Message]`: messages delivered to this connection because of other
  connections' requests since the last call (over sockets: send a cheap barrier request,
  e.g. GET_DOMAIN_PATH, and collect everything before its reply).

`make_machine(driver_factory)` builds the RuleBasedStateMachine: dom0 and two guests issue
reads, writes, mkdirs, rms, directories, get/set perms, watches and transactions on a small
path pool with tight quotas, and every reply and every watch event must match the model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenpv.xenstore.quotas import Quotas
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import Message, XsType

T = XsType


class Driver(Protocol):
    def connect(self, domid: int) -> Any: ...
    def request(self, handle: Any, msg: Message) -> list[Message]: ...
    def drain(self, handle: Any) -> list[Message]: ...
    def close(self) -> None: ...


class StoreDriver:
    """Drives a `Store` in-process."""

    def __init__(self, quotas: Quotas) -> None:
        self.store = Store(quotas)
        self.inbox: dict[int, list[Message]] = {}

    def connect(self, domid: int) -> int:
        conn = self.store.connect(domid)
        self.inbox[conn] = []
        return conn

    def request(self, handle: int, msg: Message) -> list[Message]:
        outcome = self.store.handle(handle, msg)
        for conn, reply in outcome.replies:
            self.inbox[conn].append(reply)
        mine, self.inbox[handle] = self.inbox[handle], []
        return mine

    def drain(self, handle: int) -> list[Message]:
        mine, self.inbox[handle] = self.inbox[handle], []
        return mine

    def close(self) -> None:
        pass


# -- the model ----------------------------------------------------------------------------------
class Fail(Exception):
    def __init__(self, errno: str) -> None:
        self.errno = errno


@dataclass
class MNode:
    value: bytes
    perms: list[tuple[str, int]]  # ("r", 5): letter and domid
    children: list[str]
    ver: int = 0


@dataclass
class MTx:
    view: dict[str, MNode | None] = field(default_factory=dict)
    seen: dict[str, int | None] = field(default_factory=dict)
    delta: dict[int, int] = field(default_factory=dict)
    log: list[Message] = field(default_factory=list)


@dataclass
class MConn:
    domid: int
    watches: list[tuple[str, bytes, int]] = field(default_factory=list)  # path, token, prefix
    txs: dict[int, MTx] = field(default_factory=dict)
    next_tx: int = 1


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def child_of(path: str, name: str) -> str:
    return "/" + name if path == "/" else path + "/" + name


VALID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/_@")


class Model:
    """xenstore as docs/misc/xenstore.txt and C xenstored describe it, the slow obvious way."""

    def __init__(self, quotas: Quotas) -> None:
        self.q = quotas
        self.ver = 0
        self.nodes: dict[str, MNode] = {}
        for path, children in (("/", ["tool"]), ("/tool", ["xenstored"]), ("/tool/xenstored", [])):
            self.nodes[path] = MNode(b"", [("n", 0)], list(children), self.bump())
        self.conns: dict[int, MConn] = {}
        self.domains: set[int] = set()
        self.out: dict[int, list[Message]] = {}

    def bump(self) -> int:
        self.ver += 1
        return self.ver

    def connect(self, cid: int, domid: int) -> None:
        self.conns[cid] = MConn(domid)

    # -- permissions -----------------------------------------------------------------------
    def access(self, conn: MConn, perms: list[tuple[str, int]]) -> str:
        """Letters of access: subset of "rwo"."""
        if conn.domid == 0 or perms[0][1] == conn.domid:
            return "rwo"
        for letter, domid in perms[1:]:
            if domid == conn.domid:
                return {"n": "", "r": "r", "w": "w", "b": "rw"}[letter]
        return {"n": "", "r": "r", "w": "w", "b": "rw"}[perms[0][0]]

    # -- node access through an optional transaction ----------------------------------------
    def get(self, tx: MTx | None, path: str) -> MNode | None:
        if tx is None:
            return self.nodes.get(path)
        if path not in tx.view:
            node = self.nodes.get(path)
            tx.seen[path] = node.ver if node else None
            tx.view[path] = copy.deepcopy(node)
        return tx.view[path]

    def put(self, tx: MTx | None, path: str, node: MNode | None) -> None:
        if node is not None:
            node.ver = self.bump()
        if tx is not None:
            tx.view[path] = node
        elif node is None:
            del self.nodes[path]
        else:
            self.nodes[path] = node

    def count(self, tx: MTx | None, domid: int) -> int:
        n = sum(1 for node in self.nodes.values() if node.perms[0][1] == domid)
        return n + (tx.delta.get(domid, 0) if tx else 0)

    def size(self, node: MNode) -> int:
        return 24 + 8 * len(node.perms) + len(node.value) + sum(len(c) + 1 for c in node.children)

    def lookup(self, conn: MConn, tx: MTx | None, path: str, want: str) -> MNode:
        node = self.get(tx, path)
        if node is not None and all(w in self.access(conn, node.perms) for w in want):
            return node
        errno = "ENOENT" if node is None else "EACCES"
        up, anc = path, None
        while anc is None:
            up = parent_of(up)
            anc = self.get(tx, up)
        if any(w in self.access(conn, anc.perms) for w in want):
            raise Fail(errno)
        raise Fail("EACCES")

    def canon(self, conn: MConn, raw: bytes) -> str:
        text = raw.decode()
        path = text if text.startswith("/") else f"/local/domain/{conn.domid}/{text}"
        if (
            not text
            or text.startswith("@")
            or (path != "/" and path.endswith("/"))
            or "//" in path
            or not set(path) <= VALID_CHARS
        ):
            raise Fail("EINVAL")
        return path

    # -- events -----------------------------------------------------------------------------
    def fire(self, path: str, exact: bool, perms: list[Any], old: list[Any] | None = None) -> None:
        up = self.nodes[parent_of(path)].perms
        for cid, conn in self.conns.items():
            if not (
                "r" in self.access(conn, perms)
                or (old is not None and "r" in self.access(conn, old))
                or "r" in self.access(conn, up)
            ):
                continue
            for wpath, token, prefix in conn.watches:
                hit = (
                    wpath == path
                    if exact
                    else (wpath == "/" or path == wpath or path.startswith(wpath + "/"))
                )
                if hit:
                    payload = path[prefix:].encode() + b"\0" + token + b"\0"
                    self.out[cid].append(Message(T.XS_WATCH_EVENT, 0, 0, payload))

    def fire_special(self, name: str) -> None:
        """@introduceDomain / @releaseDomain: special node perms stay "n0" here (dom0 only)."""
        for cid, conn in self.conns.items():
            if "r" not in self.access(conn, [("n", 0)]):
                continue
            for wpath, token, _ in conn.watches:
                if wpath == name:
                    payload = name.encode() + b"\0" + token + b"\0"
                    self.out[cid].append(Message(T.XS_WATCH_EVENT, 0, 0, payload))

    # -- requests ---------------------------------------------------------------------------
    def request(self, cid: int, msg: Message) -> dict[int, list[Message]]:
        """Expected messages for every connection caused by `msg` from `cid`."""
        self.out = {c: [] for c in self.conns}
        after: list[Message] = []
        conn = self.conns[cid]
        try:
            tx = None
            if msg.type in (T.XS_INTRODUCE, T.XS_RELEASE) and conn.domid != 0:
                raise Fail("EACCES")
            if msg.type not in (T.XS_WATCH, T.XS_UNWATCH) and msg.tx_id:
                if msg.tx_id not in conn.txs:
                    raise Fail("ENOENT")
                tx = conn.txs[msg.tx_id]
            payload = self.op(conn, tx, msg, after, check=True)
            reply = msg.reply(payload)
        except Fail as exc:
            reply = msg.error(exc.errno)
        self.out[cid] += [reply, *after]
        return self.out

    def op(
        self, conn: MConn, tx: MTx | None, msg: Message, after: list[Message], check: bool
    ) -> bytes:
        parts = msg.payload.split(b"\0")
        kind = msg.type
        if kind == T.XS_READ:
            return self.lookup(conn, tx, self.canon(conn, parts[0]), "r").value
        if kind == T.XS_DIRECTORY:
            node = self.lookup(conn, tx, self.canon(conn, parts[0]), "r")
            return b"".join(c.encode() + b"\0" for c in node.children)
        if kind == T.XS_GET_PERMS:
            node = self.lookup(conn, tx, self.canon(conn, parts[0]), "r")
            return b"".join(f"{letter}{d}\0".encode() for letter, d in node.perms)
        if kind in (T.XS_WRITE, T.XS_MKDIR):
            path = self.canon(conn, parts[0])
            value = msg.payload[len(parts[0]) + 1 :] if kind == T.XS_WRITE else b""
            self.write(conn, tx, path, value, mkdir=kind == T.XS_MKDIR, check=check, msg=msg)
            return b"OK\0"
        if kind == T.XS_RM:
            self.rm(conn, tx, self.canon(conn, parts[0]), check=check, msg=msg)
            return b"OK\0"
        if kind == T.XS_SET_PERMS:
            self.set_perms(conn, tx, parts, check=check, msg=msg)
            return b"OK\0"
        if kind == T.XS_WATCH:
            return self.watch(conn, parts[0], parts[1], after)
        if kind == T.XS_UNWATCH:
            path, _ = self.watch_path(conn, parts[0])
            found = [w for w in conn.watches if (w[0], w[1]) == (path, parts[1])]
            if not found:
                raise Fail("ENOENT")
            conn.watches.remove(found[0])
            return b"OK\0"
        if kind == T.XS_TRANSACTION_START:
            return self.start(conn, tx)
        if kind == T.XS_TRANSACTION_END:
            return self.end(conn, tx, parts[0])
        if kind == T.XS_INTRODUCE:
            domid = int(parts[0])
            if domid not in self.domains:
                self.domains.add(domid)
                self.fire_special("@introduceDomain")
            return b"OK\0"
        if kind == T.XS_RELEASE:
            domid = int(parts[0])
            if domid not in self.domains:
                raise Fail("ENOENT")
            self.domains.remove(domid)
            self.fire_special("@releaseDomain")
            return b"OK\0"
        raise AssertionError(f"model does not do {kind}")

    def write(
        self,
        conn: MConn,
        tx: MTx | None,
        path: str,
        value: bytes,
        *,
        mkdir: bool,
        check: bool,
        msg: Message,
    ) -> None:
        try:
            node = self.lookup(conn, tx, path, "w") if check else self.get(tx, path)
            if node is None:
                raise Fail("ENOENT")
        except Fail as exc:
            if exc.errno != "ENOENT":
                raise
            self.create(conn, tx, path, value, check)
        else:
            if mkdir:
                return
            new = copy.deepcopy(node)
            new.value = value
            if check and conn.domid != 0 and self.size(new) > self.q.node_size:
                raise Fail("ENOSPC")
            self.put(tx, path, new)
        if tx is None:
            self.fire(path, False, self.nodes[path].perms)
        else:
            tx.log.append(msg)

    def create(self, conn: MConn, tx: MTx | None, path: str, value: bytes, check: bool) -> None:
        missing = [path]
        while self.get(tx, parent_of(missing[-1])) is None:
            missing.append(parent_of(missing[-1]))
        top_path = parent_of(missing[-1])
        top = self.get(tx, top_path)
        assert top is not None
        if missing[-1].rsplit("/", 1)[1] in top.children:
            raise Fail("EAGAIN")  # stale transaction view: parent seen after the child
        perms = list(top.perms)
        if conn.domid != 0:
            perms[0] = (perms[0][0], conn.domid)
        new_nodes = {p: MNode(value if p == path else b"", list(perms), []) for p in missing}
        for p in missing:
            up = parent_of(p)
            holder = new_nodes.get(up)
            if holder is None:
                holder = copy.deepcopy(top)
                new_nodes[up] = holder
            holder.children.append(p.rsplit("/", 1)[1])
        if check and conn.domid != 0:
            if self.count(tx, conn.domid) + len(missing) > self.q.nodes_per_domain:
                raise Fail("ENOSPC")
            if any(self.size(n) > self.q.node_size for n in new_nodes.values()):
                raise Fail("ENOSPC")
        for p in [top_path, *reversed(missing)]:
            self.put(tx, p, new_nodes[p])
        if tx is not None:
            tx.delta[perms[0][1]] = tx.delta.get(perms[0][1], 0) + len(missing)

    def subtree(self, tx: MTx | None, path: str) -> list[str]:
        """Post-order: children (in order) before their parent."""
        node = self.get(tx, path)
        if node is None:
            raise Fail("EAGAIN")  # stale transaction view: child listed, but seen missing
        out: list[str] = []
        for name in node.children:
            out += self.subtree(tx, child_of(path, name))
        return [*out, path]

    def rm(self, conn: MConn, tx: MTx | None, path: str, *, check: bool, msg: Message) -> None:
        if check:
            try:
                self.lookup(conn, tx, path, "w")
            except Fail as exc:
                if exc.errno == "ENOENT" and self.get(tx, parent_of(path)) is not None:
                    return
                raise
            if path == "/":
                raise Fail("EINVAL")
        up = self.get(tx, parent_of(path))
        if up is None:
            raise Fail("EAGAIN")  # stale transaction view: parent seen missing earlier
        doomed = self.subtree(tx, path)
        if path.rsplit("/", 1)[1] not in up.children:
            raise Fail("EAGAIN")  # stale transaction view: parent seen before the child existed
        if tx is None:
            for p in doomed:
                self.fire(p, p != path, self.nodes[p].perms)
        for p in doomed:
            gone = self.get(tx, p)
            assert gone is not None
            if tx is not None:
                owner = gone.perms[0][1]
                tx.delta[owner] = tx.delta.get(owner, 0) - 1
            self.put(tx, p, None)
        new_up = copy.deepcopy(up)
        new_up.children.remove(path.rsplit("/", 1)[1])
        self.put(tx, parent_of(path), new_up)
        if tx is not None:
            tx.log.append(msg)

    def set_perms(
        self, conn: MConn, tx: MTx | None, parts: list[bytes], *, check: bool, msg: Message
    ) -> None:
        strings = parts[:-1]
        if len(strings) < 2:
            raise Fail("EINVAL")
        if conn.domid != 0 and len(strings) - 1 > self.q.perms_per_node:
            raise Fail("ENOSPC")
        perms = []
        for raw in strings[1:]:
            text = raw.decode()
            if len(text) < 2 or text[0] not in "nrwb" or not text[1:].isdigit():
                raise Fail("EINVAL")
            perms.append((text[0], int(text[1:])))
        path = self.canon(conn, strings[0])
        node = self.lookup(conn, tx, path, "wo") if check else self.get(tx, path)
        assert node is not None
        if conn.domid != 0 and perms[0][1] != node.perms[0][1]:
            raise Fail("EPERM")
        new = copy.deepcopy(node)
        new.perms = perms
        if check and conn.domid != 0 and self.size(new) > self.q.node_size:
            raise Fail("ENOSPC")
        if tx is not None:
            for owner, d in ((node.perms[0][1], -1), (perms[0][1], 1)):
                tx.delta[owner] = tx.delta.get(owner, 0) + d
        self.put(tx, path, new)
        if tx is None:
            self.fire(path, False, perms, old=node.perms)
        else:
            tx.log.append(msg)

    def watch_path(self, conn: MConn, raw: bytes) -> tuple[str, int]:
        if raw.startswith(b"@"):
            return raw.decode(), 0
        prefix = 0 if raw.startswith(b"/") else len(f"/local/domain/{conn.domid}/")
        return self.canon(conn, raw), prefix

    def watch(self, conn: MConn, raw: bytes, token: bytes, after: list[Message]) -> bytes:
        path, prefix = self.watch_path(conn, raw)
        if any((w[0], w[1]) == (path, token) for w in conn.watches):
            raise Fail("EEXIST")
        if conn.domid != 0:
            mine = sum(len(c.watches) for c in self.conns.values() if c.domid == conn.domid)
            if mine >= self.q.watches_per_domain:
                raise Fail("E2BIG")
        conn.watches.append((path, token, prefix))
        after.append(
            Message(T.XS_WATCH_EVENT, 0, 0, path[prefix:].encode() + b"\0" + token + b"\0")
        )
        return b"OK\0"

    def start(self, conn: MConn, tx: MTx | None) -> bytes:
        if tx is not None:
            raise Fail("EBUSY")
        if conn.domid != 0:
            mine = sum(len(c.txs) for c in self.conns.values() if c.domid == conn.domid)
            if mine >= self.q.transactions_per_domain:
                raise Fail("ENOSPC")
        tx_id = conn.next_tx
        while tx_id in conn.txs:
            tx_id += 1
        conn.next_tx = tx_id + 1
        conn.txs[tx_id] = MTx()
        return f"{tx_id}\0".encode()

    def end(self, conn: MConn, tx: MTx | None, arg: bytes) -> bytes:
        if arg not in (b"T", b"F"):
            raise Fail("EINVAL")
        if tx is None:
            raise Fail("ENOENT")
        del conn.txs[next(i for i, t in conn.txs.items() if t is tx)]
        if arg == b"F":
            return b"OK\0"
        for path, ver in tx.seen.items():
            node = self.nodes.get(path)
            if (node.ver if node else None) != ver:
                raise Fail("EAGAIN")
        if conn.domid != 0:
            for domid, d in tx.delta.items():
                if d > 0 and self.count(None, domid) + d > self.q.nodes_per_domain:
                    raise Fail("ENOSPC")
        for logged in tx.log:
            self.op(conn, None, logged, [], check=False)
        return b"OK\0"


# -- the state machine ----------------------------------------------------------------------------
QUOTAS = Quotas(
    nodes_per_domain=5,
    node_size=120,
    watches_per_domain=4,
    transactions_per_domain=2,
    perms_per_node=3,
    transaction_nodes=1024,
)
DOMIDS = (0, 1, 2)
PATHS = (
    "/a",
    "/a/b",
    "/a/b/c",
    "/a/d",
    "/local/domain/1",
    "/local/domain/1/x",
    "/local/domain/1/x/y",
    "/local/domain/2/x",
    "/local/domain/2/x/z",
    "x",
    "x/y",
    "x/y/z",
    "y",
    "w",
    "/",
    "/tool",
    "/a/",
    "bad path",
)
VALUES = (b"", b"1", b"v\0x", b"x" * 70, b"y" * 90)
PERM_ENTRIES = [f"{letter}{d}" for letter in "nrwb" for d in DOMIDS] + ["q1", "r"]


def make_machine(driver_factory: Callable[[Quotas], Driver]) -> type[RuleBasedStateMachine]:
    """A state machine class comparing `driver_factory(QUOTAS)` against the model."""

    class XsMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.driver = driver_factory(QUOTAS)
            self.model = Model(QUOTAS)
            self.handles: list[Any] = []
            self.req = 0

        def teardown(self) -> None:
            self.driver.close()

        def send(self, who: int, mtype: int, payload: bytes, tx: int = 0) -> list[Message]:
            self.req += 1
            msg = Message(mtype, self.req, tx, payload)
            got = self.driver.request(self.handles[who], msg)
            expected = self.model.request(who, msg)
            assert got == expected[who], (XsType(mtype).name, payload, tx, got, expected[who])
            for other in range(len(self.handles)):
                if other != who:
                    seen = self.driver.drain(self.handles[other])
                    assert seen == expected[other], (other, seen, expected[other])
            return got

        @initialize()
        def connect_all(self) -> None:
            for who, domid in enumerate(DOMIDS):
                self.handles.append(self.driver.connect(domid))
                self.model.connect(who, domid)
            # A driver may reuse one server between examples: forget domain 5 in case an
            # earlier example introduced it (OK or ENOENT: this reply is not compared).
            self.req += 1
            self.driver.request(self.handles[0], Message(T.XS_RELEASE, self.req, 0, b"5\0"))
            for handle in self.handles[1:]:
                self.driver.drain(handle)
            for domid in DOMIDS[1:]:
                self.send(0, T.XS_MKDIR, f"/local/domain/{domid}\0".encode())
                self.send(0, T.XS_SET_PERMS, f"/local/domain/{domid}\0n{domid}\0".encode())

        def tx_for(self, who: int, pick: int) -> int:
            open_txs = sorted(self.model.conns[who].txs)
            if pick == 0 or not open_txs:
                return 0
            if pick == 3:
                return 99  # unknown id
            return open_txs[pick % len(open_txs)]

        who = st.integers(0, len(DOMIDS) - 1)
        path = st.sampled_from(PATHS)
        txp = st.integers(0, 3)

        @rule(
            who=who,
            path=path,
            txp=txp,
            kind=st.sampled_from([T.XS_READ, T.XS_DIRECTORY, T.XS_GET_PERMS, T.XS_MKDIR, T.XS_RM]),
        )
        def one_path_op(self, who: int, path: str, txp: int, kind: int) -> None:
            self.send(who, kind, path.encode() + b"\0", self.tx_for(who, txp))

        @rule(who=who, path=path, txp=txp, value=st.sampled_from(VALUES))
        def write(self, who: int, path: str, txp: int, value: bytes) -> None:
            self.send(who, T.XS_WRITE, path.encode() + b"\0" + value, self.tx_for(who, txp))

        @rule(
            who=who,
            path=path,
            txp=txp,
            perms=st.lists(st.sampled_from(PERM_ENTRIES), min_size=0, max_size=4),
        )
        def set_perms(self, who: int, path: str, txp: int, perms: list[str]) -> None:
            payload = b"".join(s.encode() + b"\0" for s in (path, *perms))
            self.send(who, T.XS_SET_PERMS, payload, self.tx_for(who, txp))

        @rule(
            who=who,
            path=st.sampled_from([*PATHS[:-2], "@releaseDomain"]),
            token=st.sampled_from(["t1", "t2"]),
            unwatch=st.booleans(),
        )
        def watch(self, who: int, path: str, token: str, unwatch: bool) -> None:
            kind = T.XS_UNWATCH if unwatch else T.XS_WATCH
            self.send(who, kind, f"{path}\0{token}\0".encode())

        @rule(who=who, txp=txp)
        def start(self, who: int, txp: int) -> None:
            self.send(who, T.XS_TRANSACTION_START, b"\0", self.tx_for(who, txp))

        @precondition(lambda self: any(c.txs for c in self.model.conns.values()))
        @rule(who=who, txp=st.integers(1, 3), arg=st.sampled_from([b"T\0", b"T\0", b"F\0", b"X\0"]))
        def end(self, who: int, txp: int, arg: bytes) -> None:
            self.send(who, T.XS_TRANSACTION_END, arg, self.tx_for(who, txp))

        @invariant()
        def tree_matches(self) -> None:
            if isinstance(self.driver, StoreDriver):
                state = self.driver.store.state()
                got = {path: (value, children) for path, value, _, _, children in state["nodes"]}
                want = {p: (n.value, n.children) for p, n in self.model.nodes.items()}
                assert got == want

    return XsMachine
