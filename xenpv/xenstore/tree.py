"""The durable xenstore state: nodes, generation counter, introduced domains.

`Tree` is the committed database. Its three mutators (`create`, `set_node`, `delete`) and the
domain setters record `Change` operations as they go, so the store can hand the server one
journal record per acknowledged request; `apply` replays such a record, and `snapshot` /
`load` serialise the whole state (msgpack), `capture` + `Capture.encode` in two steps.

Generations follow C xenstored ≥ 4.9: one global counter; every node written gets the next
value (creating or deleting a child rewrites the parent, so the parent gets one too); a
deleted node has no generation. Transactions compare the generations they saw with the
committed ones (see transactions.py).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from xenpv.xenstore.changes import Change, ChangeFormatError
from xenpv.xenstore.paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN, ROOT, basename, child, parent
from xenpv.xenstore.perms import DEFAULT_PERMS, Perms, parse_perms, perms_to_strings
from xenpv.xenstore.quotas import NODE_HEADER_SIZE, PERM_ENTRY_SIZE
from xenpv.xenstore.wire import XsError

SNAPSHOT_VERSION = 1
_NO_CHILDREN: dict[str, None] = {}  # never mutated: Node copies it before adding a child


def subtree_postorder(top: str, children_of: Callable[[str], dict[str, None]]) -> list[str]:
    """Paths of `top`'s subtree, children (in order) before their parent; `children_of(path)`
    is that node's `children` (the committed tree's, or a transaction's view of them)."""
    out: list[str] = []
    stack: list[tuple[str, bool]] = [(top, False)]
    while stack:
        path, expanded = stack.pop()
        if expanded:
            out.append(path)
            continue
        stack.append((path, True))
        stack.extend((child(path, name), False) for name in reversed(children_of(path)))
    return out


@dataclass(frozen=True, slots=True)
class Capture:
    """A tree's durable state at one instant (`Tree.capture`)."""

    generation: int
    nodes: list[tuple[str, bytes, Perms, int]]
    domains: list[tuple[int, int, int]]
    targets: list[tuple[int, int]]
    special: dict[str, Perms]

    def encode(self) -> bytes:
        """The snapshot bytes (msgpack); touches nothing but the capture, so it can run in a
        worker thread while the tree keeps changing."""
        strings: dict[Perms, list[str]] = {}  # most nodes share a few permission tuples
        nodes = []
        for path, value, perms, gen in self.nodes:
            text = strings.get(perms)
            if text is None:
                text = strings[perms] = perms_to_strings(perms)
            nodes.append([path, value, text, gen])
        state = {
            "v": SNAPSHOT_VERSION,
            "g": self.generation,
            "n": nodes,
            "d": [list(domain) for domain in self.domains],
            "t": [list(target) for target in self.targets],
            "s": {path: perms_to_strings(perms) for path, perms in self.special.items()},
        }
        data: bytes = msgpack.packb(state, use_bin_type=True)
        return data


@dataclass(slots=True, eq=False)
class Node:
    """One node. `children` keeps insertion order; `childlen` is C's child-list byte size.

    `shared` says `children` may be referenced elsewhere (a transaction snapshot, or the
    empty dict every leaf shares): the dict is copied before it changes (copy-on-write keeps
    transaction snapshots O(1) and leaves cheap).
    """

    value: bytes
    perms: Perms
    gen: int
    # Leaves (most nodes) share one empty dict, copied on their first child.
    children: dict[str, None] = field(default_factory=lambda: _NO_CHILDREN)
    childlen: int = 0
    shared: bool = True

    def size(self) -> int:
        """Record size as C's `write_node_raw` computes it (the node_size quota)."""
        return (
            NODE_HEADER_SIZE + PERM_ENTRY_SIZE * len(self.perms) + len(self.value) + self.childlen
        )

    def add_child(self, name: str) -> None:
        if self.shared:
            self.children = dict(self.children)
            self.shared = False
        self.children[name] = None
        self.childlen += len(name) + 1

    def remove_child(self, name: str) -> None:
        if self.shared:
            self.children = dict(self.children)
            self.shared = False
        del self.children[name]
        self.childlen -= len(name) + 1


@dataclass(slots=True)
class DomainInfo:
    """An introduced domain (INTRODUCE arguments; xenpv has no ring to map)."""

    gfn: int
    port: int


class Tree:
    """Committed xenstore state with change recording."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.counts: dict[int, int] = {}
        self.generation = 0
        self.domains: dict[int, DomainInfo] = {}
        self.targets: dict[int, int] = {}
        self.special: dict[str, Perms] = {
            INTRODUCE_DOMAIN: DEFAULT_PERMS,
            RELEASE_DOMAIN: DEFAULT_PERMS,
        }
        self._ops: list[list[Any]] = []

    @classmethod
    def initial(cls) -> Tree:
        """`/`, `/tool`, `/tool/xenstored`, all `n0`, as C xenstored's setup_structure."""
        tree = cls()
        tree._insert(ROOT, b"", DEFAULT_PERMS, tree.next_gen())
        tree.create("/tool", b"", DEFAULT_PERMS)
        tree.create("/tool/xenstored", b"", DEFAULT_PERMS)
        tree.take_change()
        return tree

    # -- reading ---------------------------------------------------------------------------
    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def count(self, domid: int) -> int:
        return self.counts.get(domid, 0)

    def next_gen(self) -> int:
        gen = self.generation
        self.generation += 1
        return gen

    def walk(self, top: str = ROOT) -> Iterator[tuple[str, Node]]:
        """Pre-order, children in insertion order (parents before children)."""
        stack = [top]
        while stack:
            path = stack.pop()
            node = self.nodes[path]
            yield path, node
            stack.extend(child(path, name) for name in reversed(node.children))

    def subtree_postorder(self, top: str) -> list[str]:
        """Paths of `top`'s subtree, children (in order) before their parent."""
        nodes = self.nodes
        return subtree_postorder(top, lambda path: nodes[path].children)

    # -- mutators (record change operations) -----------------------------------------------
    def create(self, path: str, value: bytes, perms: Perms) -> Node:
        """New node under an existing parent; the parent gets a new generation."""
        gen = self.next_gen()
        node = self._insert(path, value, perms, gen)
        self._ops.append(["c", path, value, perms_to_strings(perms), gen])
        up = parent(path)
        parent_gen = self.next_gen()
        self.nodes[up].gen = parent_gen
        self._ops.append(["g", up, parent_gen])
        return node

    def set_node(self, path: str, value: bytes, perms: Perms) -> Node:
        node = self.nodes[path]
        self._account(node.perms[0].domid, -1)
        node.value = value
        node.perms = perms
        node.gen = self.next_gen()
        self._account(perms[0].domid, 1)
        self._ops.append(["u", path, value, perms_to_strings(perms), node.gen])
        return node

    def delete(self, path: str) -> None:
        """Remove `path` and its subtree; the parent gets a new generation."""
        self._remove(path)
        self._ops.append(["d", path])
        up = parent(path)
        gen = self.next_gen()
        self.nodes[up].gen = gen
        self._ops.append(["g", up, gen])

    def introduce(self, domid: int, gfn: int, port: int) -> None:
        self.domains[domid] = DomainInfo(gfn, port)
        self._ops.append(["i", domid, gfn, port])

    def release(self, domid: int) -> None:
        self.domains.pop(domid, None)
        self.targets.pop(domid, None)
        self._ops.append(["r", domid])

    def set_target(self, domid: int, target: int) -> None:
        self.targets[domid] = target
        self._ops.append(["t", domid, target])

    def set_special_perms(self, path: str, perms: Perms) -> None:
        self.special[path] = perms
        self._ops.append(["s", path, perms_to_strings(perms)])

    def take_change(self) -> Change | None:
        """The operations recorded since the last call, as one change (None: nothing)."""
        if not self._ops:
            return None
        change = Change(self._ops, self.generation)
        self._ops = []
        return change

    # -- low level -----------------------------------------------------------------------------
    def _account(self, domid: int, delta: int) -> None:
        left = self.counts.get(domid, 0) + delta
        if left:
            self.counts[domid] = left
        else:
            self.counts.pop(domid, None)

    def _insert(self, path: str, value: bytes, perms: Perms, gen: int) -> Node:
        node = Node(value, perms, gen)
        self.nodes[path] = node
        if path != ROOT:
            self.nodes[parent(path)].add_child(basename(path))
        self._account(perms[0].domid, 1)
        return node

    def _remove(self, path: str) -> None:
        for sub in self.subtree_postorder(path):
            gone = self.nodes.pop(sub)
            self._account(gone.perms[0].domid, -1)
        self.nodes[parent(path)].remove_child(basename(path))

    # -- persistence -------------------------------------------------------------------------
    def apply(self, change: Change) -> None:
        """Replay a change recorded by another Tree (no checks, no watches)."""
        for op in change.ops:
            try:
                self._apply_op(op)
            except (KeyError, TypeError, ValueError, XsError) as exc:
                raise ChangeFormatError(f"cannot apply {op!r:.80}: {exc!r}") from exc
        self.generation = max(self.generation, change.generation)

    def _apply_op(self, op: list[Any]) -> None:
        kind = op[0]
        if kind == "c":
            _, path, value, perms, gen = op
            if path in self.nodes or parent(path) not in self.nodes:
                raise ValueError("create of an existing node or under a missing parent")
            self._insert(path, bytes(value), parse_perms(perms), gen)
        elif kind == "u":
            _, path, value, perms, gen = op
            node = self.nodes[path]
            new_perms = parse_perms(perms)
            self._account(node.perms[0].domid, -1)
            node.value, node.perms, node.gen = bytes(value), new_perms, gen
            self._account(new_perms[0].domid, 1)
        elif kind == "g":
            self.nodes[op[1]].gen = op[2]
        elif kind == "d":
            if op[1] == ROOT:
                raise ValueError("delete of the root")
            self._remove(op[1])
        elif kind == "i":
            self.domains[op[1]] = DomainInfo(op[2], op[3])
        elif kind == "r":
            self.domains.pop(op[1], None)
            self.targets.pop(op[1], None)
        elif kind == "t":
            self.targets[op[1]] = op[2]
        elif kind == "s":
            self.special[op[1]] = parse_perms(op[2])
        else:
            raise ValueError(f"unknown operation {kind!r}")

    def snapshot(self) -> bytes:
        return self.capture().encode()

    def capture(self) -> Capture:
        """The durable state as it is now, in a form that later changes to the tree do not
        touch (values, permissions and generations are immutable): the part of a snapshot
        that must run while nothing changes the tree; `Capture.encode` may then run anywhere.

        Nodes come in the order of `nodes`, their creation order: parents come before their
        children, and siblings in the order of their parent's `children`, which is all
        `load` needs to rebuild the same tree. The cyclic garbage collector is paused while
        the rows are made (100k new tuples would otherwise set off full collections that
        cost more than the capture itself)."""
        paused = gc.isenabled()
        gc.disable()
        try:
            rows = [(path, node.value, node.perms, node.gen) for path, node in self.nodes.items()]
        finally:
            if paused:
                gc.enable()
        return Capture(
            self.generation,
            rows,
            [(domid, info.gfn, info.port) for domid, info in sorted(self.domains.items())],
            sorted(self.targets.items()),
            dict(self.special),
        )

    @classmethod
    def load(cls, data: bytes) -> Tree:
        try:
            state = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(state, dict) or state.get("v") != SNAPSHOT_VERSION:
                raise ChangeFormatError("not a xenstore snapshot of a known version")
            tree = cls()
            for path, value, perms, gen in state["n"]:
                if path in tree.nodes or (path != ROOT and parent(path) not in tree.nodes):
                    raise ChangeFormatError(f"snapshot node {path!r:.80} out of order")
                tree._insert(path, bytes(value), parse_perms(perms), gen)
            if ROOT not in tree.nodes:
                raise ChangeFormatError("snapshot without a root node")
            tree.generation = state["g"]
            tree.domains = {d: DomainInfo(gfn, port) for d, gfn, port in state["d"]}
            tree.targets = {d: t for d, t in state["t"]}
            tree.special = {path: parse_perms(p) for path, p in state["s"].items()}
        except ChangeFormatError:
            raise
        except (KeyError, TypeError, ValueError, XsError, msgpack.ExtraData) as exc:
            raise ChangeFormatError(f"corrupt snapshot: {exc!r}") from exc
        return tree

    def state(self) -> dict[str, Any]:
        """Everything durable in comparable form (tests: restore equals the live store)."""
        return {
            "nodes": [
                (path, node.value, perms_to_strings(node.perms), node.gen, list(node.children))
                for path, node in self.walk()
            ],
            "domains": {d: (i.gfn, i.port) for d, i in self.domains.items()},
            "targets": dict(self.targets),
            "special": {p: perms_to_strings(v) for p, v in self.special.items()},
            "counts": dict(self.counts),
        }
