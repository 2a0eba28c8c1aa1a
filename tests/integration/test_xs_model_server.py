"""The reference model's state machine (tests/unit/xs_model.py) against the real server.

One `xenpv xenstored` subprocess (started with the model's quotas) serves every example; dom0
talks over the Unix socket and the guests over TCP after the real authentication handshake.
Between examples the driver puts the tree back to the initial one (`/`, `/tool`,
`/tool/xenstored`, perms n0) through a separate dom0 connection, and every connection of the
previous example first sends RESET_WATCHES (which drops its watches and transactions
synchronously, so the per-domain quota counts are back to zero before the next example).
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.integration.conftest import Xenstored
from tests.unit.xs_model import DOMIDS, QUOTAS, make_machine
from xenpv import identity
from xenpv.identity import DomainKey
from xenpv.xenstore import auth
from xenpv.xenstore.quotas import QUOTA_FIELDS, Quotas
from xenpv.xenstore.wire import FrameReader, Message, XsType, split_strings

IO_TIMEOUT = 10.0
BARRIER = 0xFFFF0000  # req_ids at or above this are the driver's own


class Conn:
    """A blocking xs_wire connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT)
        self.sock = sock
        self.frames = FrameReader()
        self.inbox: list[Message] = []
        self.barriers = BARRIER

    @classmethod
    def unix(cls, path: str) -> Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    @classmethod
    def tcp(cls, port: int, key: DomainKey) -> Conn:
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        hello = _recv_exactly(sock, auth.HELLO_SIZE)
        sock.sendall(auth.proof(key, auth.parse_hello(hello)))
        assert _recv_exactly(sock, 1) == auth.ACCEPTED
        return cls(sock)

    def receive(self) -> Message:
        while not self.inbox:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstored closed the connection")
            self.inbox += self.frames.feed(data)
        return self.inbox.pop(0)

    def until_reply(self, req_id: int) -> list[Message]:
        out = []
        while True:
            msg = self.receive()
            out.append(msg)
            if msg.req_id == req_id and msg.type != XsType.XS_WATCH_EVENT:
                return out

    def request(self, msg: Message) -> list[Message]:
        self.sock.sendall(msg.encode())
        out = self.until_reply(msg.req_id)
        if msg.type == XsType.XS_WATCH and out[-1].type == XsType.XS_WATCH:
            out.append(self.receive())  # the initial event follows the OK
        return out

    def call(self, mtype: XsType, payload: bytes) -> Message:
        self.barriers += 1
        return self.request(Message(mtype, self.barriers, 0, payload))[-1]

    def drain(self) -> list[Message]:
        # Anything queued for us before the barrier's reply was caused by earlier requests.
        self.barriers += 1
        got = self.request(Message(XsType.XS_GET_DOMAIN_PATH, self.barriers, 0, b"0\0"))
        assert got[-1].type == XsType.XS_GET_DOMAIN_PATH
        return got[:-1]

    def close(self) -> None:
        self.sock.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    return data


_SERVER: Xenstored | None = None
_KEYS = {domid: DomainKey.generate(domid) for domid in DOMIDS if domid}


def _server() -> Xenstored:
    global _SERVER
    if _SERVER is None:
        workdir = Path(tempfile.mkdtemp(prefix="xsm", dir="/tmp"))
        flags: list[str] = []
        for name in QUOTA_FIELDS:  # not the per-domain overrides
            flags += [f"--quota-{name.replace('_', '-')}", str(getattr(QUOTAS, name))]
        _SERVER = Xenstored(workdir, extra=tuple(flags))
        _SERVER.start()
    return _SERVER


@pytest.fixture(scope="module", autouse=True)
def _shared_server() -> Iterator[None]:
    yield
    global _SERVER
    if _SERVER is not None:
        _SERVER.stop()
        shutil.rmtree(_SERVER.workdir, ignore_errors=True)
        _SERVER = None


class ServerDriver:
    """The model's Driver over real sockets to the shared server."""

    def __init__(self, quotas: Quotas) -> None:
        assert quotas == QUOTAS
        self.server = _server()
        self.admin = Conn.unix(self.server.socket)
        self.conns: list[Conn] = []
        self._reset_tree()

    def _ok(self, mtype: XsType, payload: bytes) -> Message:
        reply = self.admin.call(mtype, payload)
        assert reply.type == mtype, (mtype, payload, reply)
        return reply

    def _children(self, path: str) -> list[str]:
        return split_strings(self._ok(XsType.XS_DIRECTORY, path.encode() + b"\0").payload)

    def _reset_tree(self) -> None:
        for name in self._children("/"):
            if name != "tool":
                self._ok(XsType.XS_RM, f"/{name}\0".encode())
        self._ok(XsType.XS_MKDIR, b"/tool/xenstored\0")
        for name in self._children("/tool"):
            if name != "xenstored":
                self._ok(XsType.XS_RM, f"/tool/{name}\0".encode())
        for name in self._children("/tool/xenstored"):
            self._ok(XsType.XS_RM, f"/tool/xenstored/{name}\0".encode())
        for path in ("/", "/tool", "/tool/xenstored"):
            self._ok(XsType.XS_WRITE, path.encode() + b"\0")
        for path in ("/", "/tool", "/tool/xenstored", "@introduceDomain", "@releaseDomain"):
            self._ok(XsType.XS_SET_PERMS, path.encode() + b"\0n0\0")

    def connect(self, domid: int) -> Conn:
        if domid == 0:
            conn = Conn.unix(self.server.socket)
        else:
            # Publish the key, prove the domid, then remove what the model does not know.
            key = _KEYS[domid]
            self._ok(
                XsType.XS_WRITE,
                identity.pubkey_path(domid).encode() + b"\0" + key.public_hex().encode(),
            )
            conn = Conn.tcp(self.server.tcp_port, key)
            self._ok(XsType.XS_RM, b"/tool/xenpv\0")
        self.conns.append(conn)
        return conn

    def request(self, handle: Conn, msg: Message) -> list[Message]:
        assert msg.req_id < BARRIER
        return handle.request(msg)

    def drain(self, handle: Conn) -> list[Message]:
        return handle.drain()

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.call(XsType.XS_RESET_WATCHES, b"")
            finally:
                conn.close()
        self.admin.close()


def dump_tree(conn: Conn) -> dict[str, tuple[bytes, list[str], list[str]]]:
    """path -> (value, perms, children) for the whole tree, as dom0 sees it."""
    out: dict[str, tuple[bytes, list[str], list[str]]] = {}
    todo = ["/"]
    while todo:
        path = todo.pop()
        raw = path.encode() + b"\0"
        children = split_strings(conn.call(XsType.XS_DIRECTORY, raw).payload)
        value = conn.call(XsType.XS_READ, raw).payload
        perms = split_strings(conn.call(XsType.XS_GET_PERMS, raw).payload)
        out[path] = (value, perms, children)
        todo += [("" if path == "/" else path) + "/" + c for c in children]
    return out


class ServerMachine(make_machine(ServerDriver)):  # type: ignore[misc]
    def teardown(self) -> None:
        # Beyond the replies: the daemon's whole tree equals the model's at the end.
        try:
            got = dump_tree(self.driver.admin)
            want = {
                path: (node.value, [f"{letter}{d}" for letter, d in node.perms], node.children)
                for path, node in self.model.nodes.items()
            }
            assert got == want
        finally:
            super().teardown()


ServerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40)
TestServerMatchesModel = ServerMachine.TestCase


def test_handshake_struct() -> None:
    assert struct.calcsize("<I64s") == auth.PROOF_SIZE
