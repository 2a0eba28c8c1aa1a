"""Transactions: C xenstored ≥ 4.9 semantics over a copy-on-write view of the tree.

Life cycle (one table, explained once)::

    TRANSACTION_START            → open, id allocated per connection (1, 2, ...; never 0)
    request with tx_id=id        → runs against the transaction's view; replies as usual,
                                   no watch event, no journal record
    TRANSACTION_END "F"          → gone, OK
    TRANSACTION_END "T"          → gone; EAGAIN if any node the transaction *read* (every
                                   lookup counts, including the implicit ones: ancestors
                                   walked for an error code or an implicit creation, the
                                   subtree of an RM) now has another generation than when the
                                   transaction first saw it (a missing node counts as "no
                                   generation"); ENOSPC if the domain's node quota no longer
                                   fits; else OK, and the recorded mutations are applied to
                                   the committed tree in order, firing the watch events and
                                   producing one journal record
    connection closed, RESET_WATCHES, RELEASE of its domain, server restart → gone

A request whose transaction view turned out stale answers EAGAIN (see `stale_view`).

The view keeps, per path, the node as the transaction first saw it (a snapshot that shares
the committed child dict copy-on-write) or its own modified copy. That gives repeatable reads
like C's per-transaction node copies. At commit, C copies the transaction's nodes over the
committed ones; we re-run the recorded mutations instead. Both give the same tree because
every node the mutations depend on was read, and is therefore unchanged. Events at commit are
those the mutations fire when run outside a transaction (C fires one per node the
transaction modified, parents included; clients must not rely on either count).

A transaction lost to a restart (or to a closed connection): C xenstored answers ENOENT for
an unknown transaction id, and so do we, on the END and on any request carrying the id
(C xenstored's `do_transaction_end`: an unknown id → ENOENT). The id can only come back on a
new connection, and our client library (client.py) fails such a transaction with EAGAIN
itself, so `transaction()` callers retry from scratch, as they do after a conflict.

A read-write transaction that touches more than `Quotas.transaction_nodes` nodes (guests
only) gets ENOSPC on the request that would touch one more; the transaction stays usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xenpv.xenstore.paths import basename, parent
from xenpv.xenstore.perms import Perms
from xenpv.xenstore.tree import Node, Tree, subtree_postorder
from xenpv.xenstore.wire import XsError


def stale_view() -> XsError:
    """The view mixes nodes first seen at different times and contradicts itself.

    This happens only when committed nodes the transaction already read have changed since
    (a parent seen missing now has a child, a child listed by a parent has gone...), so the
    commit is bound to fail: the request answers EAGAIN at once (C answers EINVAL for some of
    these cases, and carries on with inconsistent data for others).
    """
    return XsError("EAGAIN", "transaction view is stale")


@dataclass(slots=True, eq=False)
class Transaction:
    """An open transaction: its view of the tree and what it did."""

    tx_id: int
    tree: Tree
    touch_limit: int | None  # quota on nodes touched (None: privileged, unlimited)
    entries: dict[str, Node | None] = field(default_factory=dict)
    read_gens: dict[str, int | None] = field(default_factory=dict)
    owned: set[str] = field(default_factory=set)
    delta: dict[int, int] = field(default_factory=dict)
    log: list[tuple[Any, ...]] = field(default_factory=list)

    # -- the table interface shared with Tree --------------------------------------------------
    def get(self, path: str) -> Node | None:
        if path in self.entries:
            return self.entries[path]
        if self.touch_limit is not None and len(self.entries) >= self.touch_limit:
            raise XsError("ENOSPC", "transaction touches too many nodes")
        node = self.tree.get(path)
        if node is None:
            self.read_gens[path] = None
            self.entries[path] = None
            return None
        self.read_gens[path] = node.gen
        node.shared = True
        snap = Node(node.value, node.perms, node.gen, node.children, node.childlen, shared=True)
        self.entries[path] = snap
        return snap

    def count(self, domid: int) -> int:
        return self.tree.count(domid) + self.delta.get(domid, 0)

    def create(self, path: str, value: bytes, perms: Perms) -> Node:
        up = self._own(parent(path))
        up.add_child(basename(path))
        up.gen = self.tree.next_gen()
        node = Node(value, perms, self.tree.next_gen())
        self.entries[path] = node
        self.owned.add(path)
        self._account(perms[0].domid, 1)
        return node

    def set_node(self, path: str, value: bytes, perms: Perms) -> Node:
        node = self._own(path)
        self._account(node.perms[0].domid, -1)
        node.value, node.perms, node.gen = value, perms, self.tree.next_gen()
        self._account(perms[0].domid, 1)
        return node

    def delete(self, path: str) -> None:
        doomed = self.subtree_postorder(path)  # may raise EAGAIN: nothing changed yet
        up = self._own(parent(path))
        if basename(path) not in up.children:
            raise stale_view()  # the parent was seen before the child existed
        for sub in doomed:
            gone = self.entries[sub]
            assert gone is not None
            self._account(gone.perms[0].domid, -1)
            self.entries[sub] = None
            self.owned.discard(sub)
        up.remove_child(basename(path))
        up.gen = self.tree.next_gen()

    def subtree_postorder(self, top: str) -> list[str]:
        """Like Tree.subtree_postorder, through the view (every node visited is read)."""

        def children_of(path: str) -> dict[str, None]:
            node = self.get(path)
            if node is None:
                raise stale_view()
            return node.children

        return subtree_postorder(top, children_of)

    # -- commit ----------------------------------------------------------------------------
    def conflicts(self) -> bool:
        """True when a node this transaction read has changed in the committed tree."""
        nodes = self.tree.nodes
        for path, gen in self.read_gens.items():
            node = nodes.get(path)
            if (node.gen if node is not None else None) != gen:
                return True
        return False

    def release(self) -> None:
        """Forget the view (the committed nodes stay shared until their next change)."""
        self.entries.clear()
        self.read_gens.clear()
        self.owned.clear()

    # -- internals -----------------------------------------------------------------------------
    def _own(self, path: str) -> Node:
        node = self.entries[path] if path in self.entries else self.get(path)
        if node is None:
            raise stale_view()
        if path not in self.owned:
            node = Node(
                node.value, node.perms, node.gen, dict(node.children), node.childlen, shared=False
            )
            self.entries[path] = node
            self.owned.add(path)
        return node

    def _account(self, domid: int, delta: int) -> None:
        self.delta[domid] = self.delta.get(domid, 0) + delta
