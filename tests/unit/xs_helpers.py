"""Small helpers for driving a Store directly in unit tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from xenpv.xenstore.store import ConnId, Outcome, Store
from xenpv.xenstore.wire import Message, XsType, error_name


@dataclass
class Client:
    """One connection to a Store with request helpers that return the reply payload."""

    store: Store
    domid: int
    conn: ConnId = -1
    req_id: int = 0
    last: Outcome | None = None
    inbox: dict[ConnId, list[Message]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conn = self.store.connect(self.domid)

    def send(self, mtype: int, payload: bytes, tx: int = 0) -> Message:
        """Send a request; returns this connection's reply (events are in `self.last`)."""
        self.req_id += 1
        self.last = self.store.handle(self.conn, Message(mtype, self.req_id, tx, payload))
        mine = [
            m for c, m in self.last.replies if c == self.conn and m.type != XsType.XS_WATCH_EVENT
        ]
        assert len(mine) == 1, self.last.replies
        assert mine[0].req_id == self.req_id and mine[0].tx_id == tx
        return mine[0]

    def ok(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        reply = self.send(mtype, payload, tx)
        assert reply.type == mtype, (XsType(mtype).name, error_name(reply))
        return reply.payload

    def err(self, mtype: int, payload: bytes, tx: int = 0) -> str:
        reply = self.send(mtype, payload, tx)
        assert reply.type == XsType.XS_ERROR, (XsType(mtype).name, reply.payload)
        return error_name(reply)

    # Shorthands
    def write(self, path: str, value: bytes = b"", tx: int = 0) -> None:
        assert self.ok(XsType.XS_WRITE, path.encode() + b"\0" + value, tx) == b"OK\0"

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(XsType.XS_READ, path.encode() + b"\0", tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        assert self.ok(XsType.XS_MKDIR, path.encode() + b"\0", tx) == b"OK\0"

    def rm(self, path: str, tx: int = 0) -> None:
        assert self.ok(XsType.XS_RM, path.encode() + b"\0", tx) == b"OK\0"

    def ls(self, path: str, tx: int = 0) -> list[str]:
        payload = self.ok(XsType.XS_DIRECTORY, path.encode() + b"\0", tx)
        return [p.decode() for p in payload.split(b"\0")[:-1]]

    def set_perms(self, path: str, *perms: str, tx: int = 0) -> None:
        payload = b"".join(s.encode() + b"\0" for s in (path, *perms))
        assert self.ok(XsType.XS_SET_PERMS, payload, tx) == b"OK\0"

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        payload = self.ok(XsType.XS_GET_PERMS, path.encode() + b"\0", tx)
        return [p.decode() for p in payload.split(b"\0")[:-1]]

    def watch(self, path: str, token: str) -> None:
        assert self.ok(XsType.XS_WATCH, f"{path}\0{token}\0".encode()) == b"OK\0"

    def unwatch(self, path: str, token: str) -> None:
        assert self.ok(XsType.XS_UNWATCH, f"{path}\0{token}\0".encode()) == b"OK\0"

    def start(self) -> int:
        return int(self.ok(XsType.XS_TRANSACTION_START, b"\0").rstrip(b"\0"))

    def end(self, tx: int, commit: bool = True) -> Message:
        return self.send(XsType.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)


def dom0_pair() -> tuple[Client, Client]:
    """Two dom0 connections to one new store."""
    store = Store()
    return Client(store, 0), Client(store, 0)


def events(outcome: Outcome | None, conn: ConnId) -> list[tuple[str, str]]:
    """(path, token) of the watch events `outcome` sends to `conn`."""
    assert outcome is not None
    out = []
    for c, m in outcome.replies:
        if c == conn and m.type == XsType.XS_WATCH_EVENT:
            path, token = m.payload.split(b"\0")[:2]
            out.append((path.decode(), token.decode()))
    return out


def setup_guest_homes(dom0: Client, *domids: int) -> None:
    """What a toolstack does: /local/domain/<id> owned by the guest."""
    for domid in domids:
        dom0.mkdir(f"/local/domain/{domid}")
        dom0.set_perms(f"/local/domain/{domid}", f"n{domid}")
