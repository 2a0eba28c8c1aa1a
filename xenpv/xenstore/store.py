"""The xenstore database and request semantics, sans-IO (C xenstored ≥ 4.9 behaviour).

`Store.handle(conn, message)` runs one request and returns an `Outcome`: the messages to
send (watch events for any connection first, then the caller's reply), the durable `Change`
to journal *before* sending anything, and the connections to close. The server owns sockets,
framing, the journal and the bound on pending events per connection (XSA-349); the store
never blocks, never does I/O and never raises for bad client input.

Where this file does not say otherwise, behaviour is C xenstored's (tools/xenstore/
xenstored_core.c, _watch.c, _transaction.c, _domain.c). Choices worth knowing:

- Connections: `connect(domid)`; domid 0 is privileged (the Unix socket is dom0), every other
  domid is an unprivileged guest (SET_TARGET gives it the target's rights on the target's
  nodes). Unprivileged connections are subject to `Quotas`, counted per domain.
- Error precedence for a request: unknown type → ENOSYS; privileged type from a guest →
  EACCES; unknown transaction id → ENOENT; then the operation's own checks.
- A missing node answers ENOENT if the caller has the requested access to the nearest
  existing ancestor, else EACCES (C `errno_from_parents`): creating needs write access there.
- RM of a subtree fires, before anything is deleted, one exact event per removed descendant
  (children before parents, in child order) on watches registered exactly on it, then one
  event on the removed root for watches on it or any ancestor (4.17 `delete_node` order).
  An event reaches a watcher that can read the node, or read its parent, or (SET_PERMS)
  could read it under the old permissions.
- WATCH replies OK, then queues the initial event (the event comes after the reply).
- INTRODUCE of an already introduced domain with the same gfn is OK (port updated, no
  event); with another gfn EINVAL; domid 0 (always introduced) and reserved domids EINVAL.
- RELEASE purges the domain from the tree before `@releaseDomain` fires (XSA-322/XSA-419, C's
  default): nodes it owns are removed (watches fire as for RM), its entries leave every other
  permission list, so a new domain given the same domid inherits no access.
- Watch paths may also be special `@...` paths (any, as C: only `@introduceDomain` and
  `@releaseDomain` ever fire, to watchers allowed to read the special node's permissions,
  which GET_PERMS / SET_PERMS manage). A watch on `/` does not see special events.
- Numbers in payloads (domids, ports, DIRECTORY_PART offsets) must be plain decimal; C's
  atoi() would read garbage as 0, we answer EINVAL.
- Events of a transaction, its durable change and its quota re-check happen at commit; see
  transactions.py for the conflict rule and for what a client gets after a restart (ENOENT).
- CONTROL implements `print` and `check` (both OK) and `help`; anything else is EINVAL.
- A bug raising inside a request is logged and answered EIO; the store keeps serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from xenpv.xenstore.changes import Change
from xenpv.xenstore.paths import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    ROOT,
    SPECIAL_PATHS,
    basename,
    canonicalize,
    child,
    domain_path,
    is_valid_absolute,
    parent,
)
from xenpv.xenstore.perms import (
    OWNER,
    READ,
    WRITE,
    Perm,
    Perms,
    parse_perms,
    perm_for,
)
from xenpv.xenstore.quotas import NODE_HEADER_SIZE, PERM_ENTRY_SIZE, Quotas
from xenpv.xenstore.transactions import Transaction, stale_view
from xenpv.xenstore.tree import Capture, Node, Tree
from xenpv.xenstore.watches import ConnId, WatchIndex
from xenpv.xenstore.wire import XENSTORE_PAYLOAD_MAX, Message, XsError, XsType

log = structlog.get_logger()

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
_TX_ID_MAX = 0xFFFFFFFF

Table = Tree | Transaction


@dataclass(slots=True)
class Outcome:
    """What the server must do after one request, in this order: journal `changes`
    (durably), send `replies` in order, then close the connections in `drop`."""

    replies: list[tuple[ConnId, Message]]
    changes: list[Change]
    drop: list[ConnId]


@dataclass(slots=True, eq=False)
class _Conn:
    id: ConnId
    domid: int
    privileged: bool
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_tx: int = 1


_Handler = Callable[["Store", _Conn, Table, Message], bytes]
_PRIV = 1
_NOTID = 2


class Store:
    """The xenstore database plus connections, watches and transactions."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas if quotas is not None else Quotas()
        self._tree = Tree.initial()
        self._watches = WatchIndex()
        self._conns: dict[ConnId, _Conn] = {}
        self._next_conn = 1
        self._watch_counts: dict[int, int] = {}
        self._tx_counts: dict[int, int] = {}
        # Per-request scratch.
        self._events: list[tuple[ConnId, Message]] = []
        self._after: list[tuple[ConnId, Message]] = []
        self._drop: list[ConnId] = []

    # -- connections ---------------------------------------------------------------------------
    def connect(self, domid: int) -> ConnId:
        """A new connection speaking for `domid` (0: privileged)."""
        conn = self._next_conn
        self._next_conn += 1
        self._conns[conn] = _Conn(conn, domid, privileged=domid == 0)
        return conn

    def disconnect(self, conn: ConnId) -> list[tuple[ConnId, Message]]:
        """Forget a connection, its watches and its open transactions."""
        c = self._conns.pop(conn, None)
        if c is not None:
            self._forget_watches(c)
            self._forget_transactions(c)
        return []

    def domid_of(self, conn: ConnId) -> int:
        return self._conns[conn].domid

    # -- requests ----------------------------------------------------------------------------
    def handle(self, conn: ConnId, msg: Message) -> Outcome:
        """Run one request from `conn` (a connection id from `connect`)."""
        c = self._conns[conn]
        self._events, self._after, self._drop = [], [], []
        try:
            reply = msg.reply(self._dispatch(c, msg))
            if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
                reply = msg.error("E2BIG")
        except XsError as exc:
            reply = msg.error(exc.errno_name)
        except Exception:
            # A bug must not take the server (and every other client) down.
            log.exception("xenstore request failed", type=msg.type, domid=c.domid)
            reply = msg.error("EIO")
        change = self._tree.take_change()
        replies = self._events
        replies.append((conn, reply))
        replies.extend(self._after)
        outcome = Outcome(replies, [change] if change is not None else [], self._drop)
        self._events, self._after, self._drop = [], [], []
        return outcome

    def _dispatch(self, c: _Conn, msg: Message) -> bytes:
        entry = _HANDLERS.get(msg.type)
        if entry is None:
            raise XsError("ENOSYS", f"message type {msg.type}")
        handler, flags = entry
        if flags & _PRIV and not c.privileged:
            raise XsError("EACCES", "privileged operation")
        table: Table = self._tree
        if not flags & _NOTID and msg.tx_id != 0:
            tx = c.transactions.get(msg.tx_id)
            if tx is None:
                raise XsError("ENOENT", f"no transaction {msg.tx_id}")
            table = tx
        return handler(self, c, table, msg)

    # -- persistence ---------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """msgpack of the whole durable state (nodes, generations, domains)."""
        return self._tree.snapshot()

    def capture(self) -> Capture:
        """`snapshot` in two steps: this one, fast, sees the state now; the capture's
        `encode()` can run later, elsewhere (a worker thread), while the store changes."""
        return self._tree.capture()

    @classmethod
    def restore(
        cls, snapshot: bytes | None, changes: Iterable[Change], quotas: Quotas | None = None
    ) -> Store:
        """A store holding `snapshot` (None: the initial tree) with `changes` replayed."""
        store = cls(quotas)
        if snapshot is not None:
            store._tree = Tree.load(snapshot)
        for change in changes:
            store._tree.apply(change)
        return store

    def apply(self, change: Change) -> None:
        self._tree.apply(change)

    # -- direct access (no permission checks) ---------------------------------------------------
    def get(self, path: str) -> bytes | None:
        node = self._tree.get(path)
        return None if node is None else node.value

    def node_count(self) -> int:
        return len(self._tree.nodes)

    def watch_count(self) -> int:
        return len(self._watches)

    def state(self) -> dict[str, Any]:
        """The durable state in comparable form (for tests)."""
        return self._tree.state()

    # -- helpers -------------------------------------------------------------------------------
    def _perm(self, c: _Conn, perms: Perms) -> int:
        return perm_for(perms, c.domid, c.privileged, self._tree.targets.get(c.domid))

    def _lookup(self, c: _Conn, t: Table, path: str, want: int) -> Node:
        """C `get_node`: the node if `c` has all of `want`, else ENOENT / EACCES."""
        node = t.get(path)
        if node is not None and self._perm(c, node.perms) & want == want:
            return node
        errno = "ENOENT" if node is None else "EACCES"
        up = path
        ancestor: Node | None = None
        while ancestor is None:
            up = parent(up)
            ancestor = t.get(up)
        if self._perm(c, ancestor.perms) & want:
            raise XsError(errno, path)
        raise XsError("EACCES", path)

    def _lookup_writable(self, c: _Conn, t: Table, path: str) -> Node | None:
        """`_lookup` for WRITE, but None where the node is missing (ENOENT): WRITE and MKDIR
        create it, RM finds it already gone."""
        try:
            return self._lookup(c, t, path, WRITE)
        except XsError as exc:
            if exc.errno_name != "ENOENT":
                raise
            return None

    def _missing_chain(self, t: Table, path: str) -> tuple[list[str], Node]:
        """Paths to create for `path` (deepest first) and the existing ancestor."""
        missing = [path]
        up = parent(path)
        top = t.get(up)
        while top is None:
            missing.append(up)
            up = parent(up)
            top = t.get(up)
        if basename(missing[-1]) in top.children:
            raise stale_view()  # defensive: a transaction view whose parent lists the child
        return missing, top

    def _inherit(self, c: _Conn, perms: Perms) -> Perms:
        if c.privileged:
            return perms
        return (Perm(perms[0].bits, c.domid), *perms[1:])

    def _check_create(self, c: _Conn, t: Table, path: str, value: bytes) -> None:
        if c.privileged:
            return
        quotas = self.quotas.of(c.domid)
        missing, top = self._missing_chain(t, path)
        if t.count(c.domid) + len(missing) > quotas.nodes_per_domain:
            raise XsError("ENOSPC", "node quota")
        base = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(top.perms)
        if base + len(value) > quotas.node_size:
            raise XsError("ENOSPC", "node size quota")
        for deeper in missing[:-1]:
            if base + len(basename(deeper)) + 1 > quotas.node_size:
                raise XsError("ENOSPC", "node size quota")
        if top.size() + len(basename(missing[-1])) + 1 > quotas.node_size:
            raise XsError("ENOSPC", "node size quota")

    def _check_size(self, c: _Conn, node: Node, value: bytes, nperms: int) -> None:
        if c.privileged:
            return
        size = NODE_HEADER_SIZE + PERM_ENTRY_SIZE * nperms + len(value) + node.childlen
        if size > self.quotas.of(c.domid).node_size:
            raise XsError("ENOSPC", "node size quota")

    # -- mutations shared by direct requests and transaction commits ----------------------------
    def _apply_write(self, c: _Conn, t: Table, path: str, value: bytes) -> None:
        node = t.get(path)
        if node is not None:
            node = t.set_node(path, value, node.perms)
        else:
            missing, top = self._missing_chain(t, path)
            perms = self._inherit(c, top.perms)
            for new in reversed(missing):
                node = t.create(new, value if new == path else b"", perms)
        if t is self._tree:
            assert node is not None
            self._fire(path, node, exact=False)
        elif isinstance(t, Transaction):
            t.log.append(("w", path, value))  # replayed at commit

    def _apply_rm(self, t: Table, path: str) -> None:
        if t is self._tree:
            tree = self._tree
            for sub in tree.subtree_postorder(path):
                node = tree.nodes[sub]
                self._fire(sub, node, exact=sub != path)
        t.delete(path)

    def _apply_set_perms(self, t: Table, path: str, perms: Perms) -> None:
        node = t.get(path)
        assert node is not None
        old = node.perms
        node = t.set_node(path, node.value, perms)
        if t is self._tree:
            self._fire(path, node, exact=False, old_perms=old)

    # -- watch events ----------------------------------------------------------------------------
    def _fire(
        self, path: str, node: Node | None, *, exact: bool, old_perms: Perms | None = None
    ) -> None:
        watches = self._watches.exact(path) if exact else self._watches.matching(path)
        if not watches:
            return
        permitted: dict[ConnId, bool] = {}
        parent_perms: Perms | None = None
        for watch in watches:
            ok = permitted.get(watch.conn)
            if ok is None:
                wc = self._conns[watch.conn]
                if path.startswith("@"):
                    special = self._tree.special.get(path)
                    ok = special is not None and bool(self._perm(wc, special) & READ)
                else:
                    assert node is not None
                    ok = bool(
                        (old_perms is not None and self._perm(wc, old_perms) & READ)
                        or self._perm(wc, node.perms) & READ
                    )
                    if not ok:
                        if parent_perms is None:
                            up = self._tree.get(parent(path))
                            parent_perms = up.perms if up is not None else node.perms
                        ok = bool(self._perm(wc, parent_perms) & READ)
                permitted[watch.conn] = ok
            if ok:
                payload = watch.event_path(path).encode() + b"\0" + watch.token + b"\0"
                if len(payload) <= XENSTORE_PAYLOAD_MAX:  # C drops over-long events
                    self._events.append((watch.conn, _event(payload)))

    def _forget_watches(self, c: _Conn) -> None:
        removed = self._watches.remove_conn(c.id)
        if removed:
            _adjust(self._watch_counts, c.domid, -removed)

    def _forget_transactions(self, c: _Conn) -> None:
        if c.transactions:
            _adjust(self._tx_counts, c.domid, -len(c.transactions))
            for tx in c.transactions.values():
                tx.release()
            c.transactions.clear()

    # -- request handlers ------------------------------------------------------------------------
    def _read(self, c: _Conn, t: Table, msg: Message) -> bytes:
        path = canonicalize(_onearg(msg), c.domid)
        return self._lookup(c, t, path, READ).value

    def _directory(self, c: _Conn, t: Table, msg: Message) -> bytes:
        path = canonicalize(_onearg(msg), c.domid)
        node = self._lookup(c, t, path, READ)
        if node.childlen > XENSTORE_PAYLOAD_MAX:
            raise XsError("E2BIG", path)
        return b"".join(name.encode() + b"\0" for name in node.children)

    def _directory_part(self, c: _Conn, t: Table, msg: Message) -> bytes:
        if msg.payload.count(b"\0") != 2:
            raise XsError("EINVAL", "DIRECTORY_PART wants path and offset")
        raw_path, raw_off = _strings(msg)
        path = canonicalize(_ascii(raw_path), c.domid)
        offset = _decimal(raw_off)
        node = self._lookup(c, t, path, READ)
        gen = str(node.gen).encode() + b"\0"
        if offset >= node.childlen:
            return gen + b"\0"
        data = b"".join(name.encode() + b"\0" for name in node.children)
        maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        length = 0
        while True:
            start = offset + length
            slen = data.index(b"\0", start) - start
            if length + slen >= maxlen:
                break
            length += slen + 1
            if offset + length == node.childlen:
                break
        out = gen + data[offset : offset + length]
        if offset + length == node.childlen:
            out += b"\0"
        return out

    def _get_perms(self, c: _Conn, t: Table, msg: Message) -> bytes:
        raw = _onearg(msg)
        if raw.startswith("@"):
            perms = self._special_perms(raw)
            if not self._perm(c, perms) & READ:
                raise XsError("EACCES", raw)
        else:
            perms = self._lookup(c, t, canonicalize(raw, c.domid), READ).perms
        return b"".join(str(p).encode() + b"\0" for p in perms)

    def _write(self, c: _Conn, t: Table, msg: Message) -> bytes:
        cut = msg.payload.find(b"\0")
        if cut < 0:
            raise XsError("EINVAL", "WRITE without path")
        path = canonicalize(_ascii(msg.payload[:cut]), c.domid)
        value = msg.payload[cut + 1 :]
        node = self._lookup_writable(c, t, path)
        if node is None:
            self._check_create(c, t, path, value)
        else:
            self._check_size(c, node, value, len(node.perms))
        self._apply_write(c, t, path, value)
        return b"OK\0"

    def _mkdir(self, c: _Conn, t: Table, msg: Message) -> bytes:
        path = canonicalize(_onearg(msg), c.domid)
        if self._lookup_writable(c, t, path) is None:
            self._check_create(c, t, path, b"")
            self._apply_write(c, t, path, b"")
        return b"OK\0"

    def _rm(self, c: _Conn, t: Table, msg: Message) -> bytes:
        path = canonicalize(_onearg(msg), c.domid)
        if self._lookup_writable(c, t, path) is None:
            if t.get(parent(path)) is not None:
                return b"OK\0"  # already gone, fine
            raise XsError("ENOENT", path)
        if path == ROOT:
            raise XsError("EINVAL", "cannot remove /")
        if t.get(parent(path)) is None:
            raise stale_view()  # only in a transaction: the parent was seen missing earlier
        self._apply_rm(t, path)
        if isinstance(t, Transaction):
            t.log.append(("r", path))
        return b"OK\0"

    def _set_perms(self, c: _Conn, t: Table, msg: Message) -> bytes:
        count = msg.payload.count(b"\0")
        if count < 2:
            raise XsError("EINVAL", "SET_PERMS wants a path and permissions")
        if not c.privileged and count - 1 > self.quotas.of(c.domid).perms_per_node:
            raise XsError("ENOSPC", "permission quota")
        strings = [_ascii(s) for s in _strings(msg)]
        raw, perms = strings[0], parse_perms(strings[1:count])
        if raw.startswith("@"):
            current = self._special_perms(raw)
            if self._perm(c, current) & (WRITE | OWNER) != WRITE | OWNER:
                raise XsError("EACCES", raw)
            self._tree.set_special_perms(raw, perms)
            return b"OK\0"
        path = canonicalize(raw, c.domid)
        node = self._lookup(c, t, path, WRITE | OWNER)
        if not c.privileged and perms[0].domid != node.perms[0].domid:
            raise XsError("EPERM", "only a privileged domain may change the owner")
        self._check_size(c, node, node.value, len(perms))
        self._apply_set_perms(t, path, perms)
        if isinstance(t, Transaction):
            t.log.append(("p", path, perms))
        return b"OK\0"

    def _special_perms(self, raw: str) -> Perms:
        perms = self._tree.special.get(raw)
        if perms is None:
            raise XsError("EINVAL", f"no special node {raw[:64]!r}")
        return perms

    def _watch_path(self, c: _Conn, raw: bytes) -> tuple[str, int]:
        """Canonical watch path and the prefix length stripped from its events."""
        text = _ascii(raw)
        if text.startswith("@"):
            if not is_valid_absolute("/" + text[1:]) or text.endswith("/"):
                raise XsError("EINVAL", f"invalid watch path {text[:64]!r}")
            return text, 0
        if text.startswith("/"):
            return canonicalize(text, c.domid), 0
        return canonicalize(text, c.domid), len(domain_path(c.domid)) + 1

    def _watch(self, c: _Conn, t: Table, msg: Message) -> bytes:
        strings = _strings(msg)
        if len(strings) != 2:
            raise XsError("EINVAL", "WATCH wants path and token")
        path, prefix_len = self._watch_path(c, strings[0])
        token = strings[1]
        if self._watches.find(c.id, path, token) is not None:
            raise XsError("EEXIST", path)
        if (
            not c.privileged
            and self._watch_counts.get(c.domid, 0) >= self.quotas.of(c.domid).watches_per_domain
        ):
            raise XsError("E2BIG", "watch quota")
        watch = self._watches.add(c.id, path, token, prefix_len)
        _adjust(self._watch_counts, c.domid, 1)
        payload = watch.event_path(path).encode() + b"\0" + token + b"\0"
        if len(payload) <= XENSTORE_PAYLOAD_MAX:
            self._after.append((c.id, _event(payload)))
        return b"OK\0"

    def _unwatch(self, c: _Conn, t: Table, msg: Message) -> bytes:
        strings = _strings(msg)
        if len(strings) != 2:
            raise XsError("EINVAL", "UNWATCH wants path and token")
        path, _ = self._watch_path(c, strings[0])
        watch = self._watches.find(c.id, path, strings[1])
        if watch is None:
            raise XsError("ENOENT", path)
        self._watches.remove(watch)
        _adjust(self._watch_counts, c.domid, -1)
        return b"OK\0"

    def _transaction_start(self, c: _Conn, t: Table, msg: Message) -> bytes:
        if isinstance(t, Transaction):
            raise XsError("EBUSY", "nested transaction")
        if (
            not c.privileged
            and self._tx_counts.get(c.domid, 0) >= self.quotas.of(c.domid).transactions_per_domain
        ):
            raise XsError("ENOSPC", "transaction quota")
        tx_id = c.next_tx
        while tx_id == 0 or tx_id in c.transactions:
            tx_id = (tx_id + 1) & _TX_ID_MAX
        c.next_tx = (tx_id + 1) & _TX_ID_MAX
        limit = None if c.privileged else self.quotas.of(c.domid).transaction_nodes
        c.transactions[tx_id] = Transaction(tx_id, self._tree, limit)
        _adjust(self._tx_counts, c.domid, 1)
        return f"{tx_id}\0".encode()

    def _transaction_end(self, c: _Conn, t: Table, msg: Message) -> bytes:
        arg = _onearg(msg)
        if arg not in ("T", "F"):
            raise XsError("EINVAL", "TRANSACTION_END wants T or F")
        if not isinstance(t, Transaction):
            raise XsError("ENOENT", "no transaction")
        del c.transactions[t.tx_id]
        _adjust(self._tx_counts, c.domid, -1)
        try:
            if arg == "T":
                self._commit(c, t)
        finally:
            t.release()
        return b"OK\0"

    def _commit(self, c: _Conn, tx: Transaction) -> None:
        if tx.conflicts():
            raise XsError("EAGAIN", "transaction conflict")
        if not c.privileged:
            for domid, delta in tx.delta.items():
                limit = self.quotas.of(domid).nodes_per_domain
                if delta > 0 and self._tree.count(domid) + delta > limit:
                    raise XsError("ENOSPC", "node quota at commit")
        tree = self._tree
        for op in tx.log:
            kind = op[0]
            if kind == "w":
                self._apply_write(c, tree, op[1], op[2])
            elif kind == "r":
                self._apply_rm(tree, op[1])
            else:
                self._apply_set_perms(tree, op[1], op[2])

    def _introduce(self, c: _Conn, t: Table, msg: Message) -> bytes:
        strings = _strings(msg)
        if len(strings) < 3:
            raise XsError("EINVAL", "INTRODUCE wants domid, gfn and port")
        domid = _domid(strings[0])
        gfn, port = _decimal(strings[1]), _decimal(strings[2])
        if port == 0:
            raise XsError("EINVAL", "event channel port 0")
        known = self._tree.domains.get(domid)
        if known is None:
            self._tree.introduce(domid, gfn, port)
            self._fire(INTRODUCE_DOMAIN, None, exact=False)
        elif known.gfn != gfn:
            raise XsError("EINVAL", f"domain {domid} already introduced")
        elif known.port != port:
            self._tree.introduce(domid, gfn, port)
        return b"OK\0"

    def _known_domain(self, msg: Message) -> int:
        domid = _domid(_onearg(msg).encode())
        if domid not in self._tree.domains:
            raise XsError("ENOENT", f"domain {domid} not introduced")
        return domid

    def _release(self, c: _Conn, t: Table, msg: Message) -> bytes:
        domid = self._known_domain(msg)
        self._tree.release(domid)
        for other in list(self._conns.values()):
            if other.domid == domid:
                self._forget_watches(other)
                self._forget_transactions(other)
                self._drop.append(other.id)
        self._purge_domain(domid)
        self._fire(RELEASE_DOMAIN, None, exact=False)
        return b"OK\0"

    def _purge_domain(self, domid: int) -> None:
        """Forget a released domain in the tree, so a new domain reusing its domid inherits
        nothing (XSA-322, XSA-419; C xenstored's default without --keep-orphans): nodes it
        owns are removed with their subtrees (watches fire as for RM), and it is taken out of
        every other node's permission list, special nodes included (no events for those)."""
        tree = self._tree
        owned: list[str] = []
        edited: list[tuple[str, Perms]] = []
        stack = [ROOT]
        while stack:
            path = stack.pop()
            node = tree.nodes[path]
            perms = node.perms
            if perms[0].domid == domid and path != ROOT:
                owned.append(path)  # its subtree goes with it
                continue
            if len(perms) > 1 and any(p.domid == domid for p in perms[1:]):
                edited.append((path, _without_domain(perms, domid)))
            stack.extend(child(path, name) for name in node.children)
        for path in owned:
            self._apply_rm(tree, path)
        for path, perms in edited:
            tree.set_node(path, tree.nodes[path].value, perms)
        for path, perms in list(tree.special.items()):
            if any(p.domid == domid for p in perms):
                tree.set_special_perms(path, _without_domain(perms, domid))
        if owned or edited:
            log.info("released domain purged", domid=domid, removed=len(owned), acl=len(edited))

    def _resume(self, c: _Conn, t: Table, msg: Message) -> bytes:
        self._known_domain(msg)
        return b"OK\0"

    def _is_domain_introduced(self, c: _Conn, t: Table, msg: Message) -> bytes:
        domid = _decimal(_onearg(msg).encode())
        introduced = domid in (0, DOMID_SELF) or domid in self._tree.domains
        return b"T\0" if introduced else b"F\0"

    def _get_domain_path(self, c: _Conn, t: Table, msg: Message) -> bytes:
        domid = _decimal(_onearg(msg).encode())
        return domain_path(domid).encode() + b"\0"

    def _set_target(self, c: _Conn, t: Table, msg: Message) -> bytes:
        strings = _strings(msg)
        if len(strings) < 2:
            raise XsError("EINVAL", "SET_TARGET wants domid and target")
        domid, target = _domid(strings[0]), _domid(strings[1])
        for d in (domid, target):
            if d not in self._tree.domains:
                raise XsError("ENOENT", f"domain {d} not introduced")
        self._tree.set_target(domid, target)
        return b"OK\0"

    def _reset_watches(self, c: _Conn, t: Table, msg: Message) -> bytes:
        self._forget_watches(c)
        self._forget_transactions(c)
        return b"OK\0"

    def _control(self, c: _Conn, t: Table, msg: Message) -> bytes:
        strings = _strings(msg)
        if not strings:
            raise XsError("EINVAL", "CONTROL without command")
        command = strings[0]
        if command == b"print":
            log.info(
                "xenstore control print", text=b" ".join(strings[1:]).decode("ascii", "replace")
            )
            return b"OK\0"
        if command == b"check":
            self._check_consistency()
            return b"OK\0"
        if command == b"help":
            return b"check\nhelp\nprint <string>\n\0"
        raise XsError("EINVAL", f"unsupported control command {command[:32]!r}")

    def _check_consistency(self) -> None:
        counts: dict[int, int] = {}
        for path, node in self._tree.walk():
            counts[node.perms[0].domid] = counts.get(node.perms[0].domid, 0) + 1
            if node.childlen != sum(len(n) + 1 for n in node.children):
                raise XsError("EIO", f"child list size of {path}")
        if counts != self._tree.counts or len(self._tree.nodes) != sum(counts.values()):
            raise XsError("EIO", "node accounting")


# -- payload helpers ------------------------------------------------------------------------------
def _event(payload: bytes) -> Message:
    return Message(XsType.XS_WATCH_EVENT, 0, 0, payload)


def _adjust(counts: dict[int, int], key: int, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise XsError("EINVAL", "non-ASCII string") from None


def _onearg(msg: Message) -> str:
    """C `onearg`: exactly one string, NUL-terminated, nothing after it."""
    payload = msg.payload
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError("EINVAL", "expected one NUL-terminated argument")
    return _ascii(payload[:-1])


def _without_domain(perms: Perms, domid: int) -> Perms:
    """`perms` with `domid`'s entries dropped; if it was the owner, dom0 owns it instead (with
    the same default access)."""
    owner = perms[0]
    if owner.domid == domid:
        owner = Perm(owner.bits, 0)
    return (owner, *(p for p in perms[1:] if p.domid != domid))


def _strings(msg: Message) -> list[bytes]:
    """C `get_strings`: the NUL-terminated strings (bytes after the last NUL are ignored)."""
    parts = msg.payload.split(b"\0")
    parts.pop()
    return parts


def _decimal(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 10:
        raise XsError("EINVAL", f"not a decimal number: {raw[:16]!r}")
    return int(raw)


def _domid(raw: bytes) -> int:
    domid = _decimal(raw)
    if domid == 0 or domid >= DOMID_FIRST_RESERVED:
        raise XsError("EINVAL", f"domid {domid} cannot be used here")
    return domid


_HANDLERS: dict[int, tuple[_Handler, int]] = {
    XsType.XS_CONTROL: (Store._control, _PRIV),
    XsType.XS_DIRECTORY: (Store._directory, 0),
    XsType.XS_READ: (Store._read, 0),
    XsType.XS_GET_PERMS: (Store._get_perms, 0),
    XsType.XS_WATCH: (Store._watch, _NOTID),
    XsType.XS_UNWATCH: (Store._unwatch, _NOTID),
    XsType.XS_TRANSACTION_START: (Store._transaction_start, 0),
    XsType.XS_TRANSACTION_END: (Store._transaction_end, 0),
    XsType.XS_INTRODUCE: (Store._introduce, _PRIV),
    XsType.XS_RELEASE: (Store._release, _PRIV),
    XsType.XS_GET_DOMAIN_PATH: (Store._get_domain_path, 0),
    XsType.XS_WRITE: (Store._write, 0),
    XsType.XS_MKDIR: (Store._mkdir, 0),
    XsType.XS_RM: (Store._rm, 0),
    XsType.XS_SET_PERMS: (Store._set_perms, 0),
    XsType.XS_IS_DOMAIN_INTRODUCED: (Store._is_domain_introduced, _PRIV),
    XsType.XS_RESUME: (Store._resume, _PRIV),
    XsType.XS_SET_TARGET: (Store._set_target, _PRIV),
    XsType.XS_RESET_WATCHES: (Store._reset_watches, 0),
    XsType.XS_DIRECTORY_PART: (Store._directory_part, 0),
}

__all__ = ["SPECIAL_PATHS", "Change", "ConnId", "Outcome", "Quotas", "Store"]
