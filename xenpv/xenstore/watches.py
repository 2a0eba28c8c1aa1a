"""Watch registry indexed by path, so firing costs O(path depth), not O(watches).

An event on `/a/b/c` reaches watches registered on `/a/b/c`, `/a/b`, `/a` and `/` (C
`is_child`); an "exact" event (RM of a subtree, for the nodes below the removed root) reaches
only watches registered on that very path. Special paths (`@introduceDomain`,
`@releaseDomain`) are matched exactly: a watch on `/` does not see them (as in current C
xenstored, whose `is_child` requires the child to start with the parent).

Matching watches are returned in registration order, which is the order C xenstored
delivers them on one connection (it walks each connection's watch list in order).
"""

from __future__ import annotations

from dataclasses import dataclass

ConnId = int


@dataclass(slots=True, eq=False)
class Watch:
    """One registration: `path` is canonical; `prefix` is stripped from event paths."""

    conn: ConnId
    path: str
    token: bytes
    prefix_len: int
    seq: int

    def event_path(self, path: str) -> str:
        return path[self.prefix_len :]


class WatchIndex:
    """Watches by path and by connection."""

    __slots__ = ("_by_conn", "_by_path", "_seq")

    def __init__(self) -> None:
        self._by_path: dict[str, dict[tuple[ConnId, bytes], Watch]] = {}
        self._by_conn: dict[ConnId, dict[tuple[str, bytes], Watch]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return sum(len(ws) for ws in self._by_conn.values())

    def count(self, conn: ConnId) -> int:
        return len(self._by_conn.get(conn, ()))

    def find(self, conn: ConnId, path: str, token: bytes) -> Watch | None:
        return self._by_conn.get(conn, {}).get((path, token))

    def add(self, conn: ConnId, path: str, token: bytes, prefix_len: int) -> Watch:
        self._seq += 1
        watch = Watch(conn, path, token, prefix_len, self._seq)
        self._by_path.setdefault(path, {})[(conn, token)] = watch
        self._by_conn.setdefault(conn, {})[(path, token)] = watch
        return watch

    def remove(self, watch: Watch) -> None:
        bucket = self._by_path[watch.path]
        del bucket[(watch.conn, watch.token)]
        if not bucket:
            del self._by_path[watch.path]
        per_conn = self._by_conn[watch.conn]
        del per_conn[(watch.path, watch.token)]
        if not per_conn:
            del self._by_conn[watch.conn]

    def remove_conn(self, conn: ConnId) -> int:
        """Drop every watch of `conn`; returns how many there were."""
        watches = list(self._by_conn.get(conn, {}).values())
        for watch in watches:
            self.remove(watch)
        return len(watches)

    def of_conn(self, conn: ConnId) -> list[Watch]:
        return sorted(self._by_conn.get(conn, {}).values(), key=lambda w: w.seq)

    def matching(self, path: str) -> list[Watch]:
        """Watches on `path` or any ancestor (exactly `path` for a special `@` path)."""
        by_path = self._by_path
        if not by_path:
            return []
        if path.startswith("@"):
            return self.exact(path)
        found: list[Watch] = []
        buckets = 0
        candidate = path
        while True:  # path, its parent, ..., "/" (inlined ancestors_or_self: hot path)
            bucket = by_path.get(candidate)
            if bucket:
                found.extend(bucket.values())
                buckets += 1
            if candidate == "/":
                break
            cut = candidate.rfind("/")
            candidate = candidate[:cut] if cut > 0 else "/"
        if buckets > 1:
            found.sort(key=lambda w: w.seq)
        return found

    def exact(self, path: str) -> list[Watch]:
        bucket = self._by_path.get(path)
        return list(bucket.values()) if bucket else []
