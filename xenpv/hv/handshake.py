"""Mutual proof of domid on a new domain link, and the shared-memory set-up.

Dialer D (wants to reach A) and acceptor A, each frame length-prefixed msgpack:

1. D → A  {v, from: D, to: A, challenge: cD, shm: D's wish, layout: D's memory layout}
2. A → D  {from: A, challenge: cA, sig: A signs (cD ‖ D) for b"link-accept", layout}
3. D → A  {sig: D signs (cA ‖ A) for b"link-dial"}
4. A → D  {ok, shm, error}
5. shm only: D sends its memfd (one byte + SCM_RIGHTS), then A sends its memfd.

Each side checks the other's signature against the public key from the `PeerDirectory`
(`DomainKey.sign` binds the signer's domid too). Binding the verifier's domid and the role
into the signed bytes stops a relay: a domain E that receives D's challenge cannot make A sign
it as "dialer to D" by talking to A itself (A would sign it for E, or as acceptor).

Shared memory is used iff the link is a Unix socket, neither side asked for "socket", and
the acceptor agrees; a side that demands "shm" on a link that cannot have it fails the link.
Step 4 also breaks a simultaneous-dial tie: when both domains dial each other at once, the
link dialed by the lower domid wins and the other dialer is told `dup` (it then waits for
the winning link instead).
"""

from __future__ import annotations

import array
import mmap
import socket
from dataclasses import dataclass
from typing import Any

import trio

from xenpv.hv.errors import LinkError
from xenpv.hv.memory import SharedPeerMemory
from xenpv.hv.messages import frame, frame_length, parse_frame
from xenpv.identity import DomainKey, new_challenge, verify

PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 10.0


@dataclass(slots=True)
class Layout:
    """What a peer needs to map this domain's memory file."""

    nr_frames: int
    nr_grants: int
    size: int

    def wire(self) -> list[int]:
        return [self.nr_frames, self.nr_grants, self.size]

    @classmethod
    def parse(cls, value: Any) -> Layout:
        if not (isinstance(value, list) and len(value) == 3 and all(type(v) is int for v in value)):
            raise LinkError("malformed memory layout in handshake")
        layout = cls(*value)
        if (
            layout.nr_frames < 0
            or layout.nr_grants < 0
            or layout.size < (layout.nr_frames << 12) + layout.nr_grants * 8
        ):
            raise LinkError("inconsistent memory layout in handshake")
        return layout


def _signed(challenge: bytes, verifier: int) -> bytes:
    return challenge + verifier.to_bytes(2, "little")


async def _recv_exact(sock: trio.socket.SocketType, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await sock.recv(n - len(data))
        if not chunk:
            raise LinkError("peer closed the link during the handshake")
        data += chunk
    return bytes(data)


async def _read(sock: trio.socket.SocketType) -> dict[str, Any]:
    length = frame_length(await _recv_exact(sock, 4))
    return parse_frame(await _recv_exact(sock, length))


async def _send_fd(sock: trio.socket.SocketType, fd: int) -> None:
    await sock.sendmsg([b"M"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


async def _recv_fd(sock: trio.socket.SocketType) -> int:
    data, ancdata, _flags, _addr = await sock.recvmsg(1, socket.CMSG_SPACE(4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if data != b"M" or len(fds) != 1:
        for fd in fds:
            socket.close(fd)
        raise LinkError("peer did not pass its memory file")
    return fds[0]


def map_peer_memory(fd: int, layout: Layout) -> SharedPeerMemory:
    import os

    if os.fstat(fd).st_size < layout.size:
        raise LinkError("peer memory file is smaller than its announced layout")
    mm = mmap.mmap(fd, layout.size)
    return SharedPeerMemory(fd, memoryview(mm), layout.nr_frames, layout.nr_grants)


def _get(obj: dict[str, Any], key: str, kind: type) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise LinkError(f"handshake field {key!r} missing or malformed")
    return value


@dataclass(slots=True)
class Established:
    peer: int
    shared: SharedPeerMemory | None


class Duplicate(LinkError):
    """The acceptor already has (or is getting) a link to us: use that one."""


@dataclass(frozen=True, slots=True)
class Terms:
    """What this end brings to every link it sets up: the key that proves its domid, the
    transport it asks for, and its memory file (descriptor and layout) for shared memory."""

    key: DomainKey
    transport: str
    memory_fd: int
    layout: Layout


def _wants_shm(transport: str, is_unix: bool) -> bool:
    return is_unix and transport != "socket"


async def dial(
    stream: trio.SocketStream, terms: Terms, *, peer: int, peer_pubkey: str
) -> Established:
    key, transport = terms.key, terms.transport
    sock = stream.socket
    is_unix = sock.family == socket.AF_UNIX
    if transport == "shm" and not is_unix:
        raise LinkError(f"transport 'shm' needs a Unix-socket link to domain {peer}")
    mine = new_challenge()
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await stream.send_all(
            frame(
                {
                    "v": PROTOCOL_VERSION,
                    "from": key.domid,
                    "to": peer,
                    "challenge": mine,
                    "shm": _wants_shm(transport, is_unix),
                    "layout": terms.layout.wire(),
                }
            )
        )
        hello = await _read(sock)
        if "error" in hello:
            raise LinkError(f"domain {peer} refused the link: {hello['error']}")
        if _get(hello, "from", int) != peer:
            raise LinkError(f"endpoint of domain {peer} answered as domain {hello['from']}")
        theirs = _get(hello, "challenge", bytes)
        if not verify(
            peer_pubkey, peer, b"link-accept", _signed(mine, key.domid), _get(hello, "sig", bytes)
        ):
            raise LinkError(f"domain {peer} failed to prove its identity")
        peer_layout = Layout.parse(hello.get("layout"))
        await stream.send_all(frame({"sig": key.sign(b"link-dial", _signed(theirs, peer))}))
        verdict = await _read(sock)
        if not verdict.get("ok"):
            reason = verdict.get("error", "refused")
            if reason == "dup":
                raise Duplicate(f"domain {peer} already has a link to us")
            raise LinkError(f"domain {peer} refused the link: {reason}")
        shared = None
        if verdict.get("shm"):
            await _send_fd(sock, terms.memory_fd)
            fd = await _recv_fd(sock)
            shared = map_peer_memory(fd, peer_layout)
        elif transport == "shm":
            raise LinkError(f"domain {peer} refused the shared-memory transport")
    return Established(peer, shared)


class AcceptPolicy:
    """How the acceptor resolves identity and ties (provided by the domain runtime)."""

    async def pubkey(self, domid: int) -> str:
        raise NotImplementedError

    def admit(self, domid: int) -> bool:
        """False if a link to `domid` exists or our own dial to it must win."""
        raise NotImplementedError


async def accept(stream: trio.SocketStream, terms: Terms, *, policy: AcceptPolicy) -> Established:
    key, transport = terms.key, terms.transport
    sock = stream.socket
    is_unix = sock.family == socket.AF_UNIX
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        hello = await _read(sock)
        if hello.get("v") != PROTOCOL_VERSION:
            await stream.send_all(frame({"error": "unsupported link protocol version"}))
            raise LinkError(f"dialer speaks link protocol {hello.get('v')!r}")
        peer = _get(hello, "from", int)
        if _get(hello, "to", int) != key.domid:
            await stream.send_all(frame({"error": f"this is domain {key.domid}"}))
            raise LinkError(f"dialer wanted domain {hello['to']}, this is {key.domid}")
        theirs = _get(hello, "challenge", bytes)
        peer_layout = Layout.parse(hello.get("layout"))
        try:
            pubkey = await policy.pubkey(peer)
        except LinkError:
            await stream.send_all(frame({"error": f"unknown domain {peer}"}))
            raise
        mine = new_challenge()
        await stream.send_all(
            frame(
                {
                    "from": key.domid,
                    "challenge": mine,
                    "sig": key.sign(b"link-accept", _signed(theirs, peer)),
                    "layout": terms.layout.wire(),
                }
            )
        )
        proof = await _read(sock)
        if not verify(pubkey, peer, b"link-dial", _signed(mine, key.domid), proof.get("sig", b"")):
            await stream.send_all(frame({"ok": False, "error": "identity proof failed"}))
            raise LinkError(f"dialer failed to prove it is domain {peer}")
        shm = bool(hello.get("shm")) and _wants_shm(transport, is_unix)
        if not shm and transport == "shm":
            await stream.send_all(frame({"ok": False, "error": "shared memory required"}))
            raise LinkError(f"domain {peer} cannot use the shared-memory transport")
        if not policy.admit(peer):
            await stream.send_all(frame({"ok": False, "error": "dup"}))
            raise Duplicate(f"already linked to domain {peer}")
        await stream.send_all(frame({"ok": True, "shm": shm}))
        shared = None
        if shm:
            fd = await _recv_fd(sock)
            await _send_fd(sock, terms.memory_fd)
            shared = map_peer_memory(fd, peer_layout)
    return Established(peer, shared)
