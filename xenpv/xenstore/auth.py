"""The TCP authentication handshake: a domain proves its domid before speaking xs_wire.

The Unix socket is dom0 (privileged, mode 0600). Every other domain reaches xenstored over
TCP and must first prove which domain it is, with the Ed25519 secret the toolstack issued
when it created the domain (`xenpv.identity`); the public half is in the store at
`identity.pubkey_path(domid)`. The exchange (all integers little-endian):

    server → client  HELLO   = b"XPVXSA1\\n" (8 bytes) + challenge (32 random bytes)
    client → server  PROOF   = domid (u32) + signature (64 bytes)
                               signature = DomainKey.sign(b"xenstore", challenge)
    server → client  RESULT  = one byte: 0x00 accepted, 0x01 refused
    then, if accepted, plain xs_wire in both directions with that domid.

The server refuses (RESULT 0x01, then closes) when the domid is 0 (dom0 only ever uses the
Unix socket) or reserved (≥ DOMID_FIRST_RESERVED), when no public key is published for it, or
when the signature does not verify. A connection that does not complete the handshake within
the server's deadline is closed without a RESULT. Nothing sent before RESULT is interpreted
as xs_wire, so an unauthenticated peer can do nothing at all.

This module holds the pure message codec plus the two small async drivers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio

from xenpv import identity
from xenpv.errors import XenpvError
from xenpv.identity import DomainKey

MAGIC = b"XPVXSA1\n"
PURPOSE = b"xenstore"
HELLO_SIZE = len(MAGIC) + identity.CHALLENGE_SIZE
_PROOF = struct.Struct("<I64s")
PROOF_SIZE = _PROOF.size
ACCEPTED = b"\x00"
REFUSED = b"\x01"
DOMID_FIRST_RESERVED = 0x7FF0


class AuthError(XenpvError):
    """The handshake failed: malformed message, refused proof or connection lost."""


def hello(challenge: bytes) -> bytes:
    """The server's first message."""
    if len(challenge) != identity.CHALLENGE_SIZE:
        raise ValueError("challenge must be 32 bytes")
    return MAGIC + challenge


def parse_hello(data: bytes) -> bytes:
    """The challenge carried by a server HELLO."""
    if len(data) != HELLO_SIZE or not data.startswith(MAGIC):
        raise AuthError("peer is not a xenpv xenstored (bad handshake magic)")
    return data[len(MAGIC) :]


def proof(key: DomainKey, challenge: bytes) -> bytes:
    """The client's answer to `challenge`."""
    return _PROOF.pack(key.domid, key.sign(PURPOSE, challenge))


def parse_proof(data: bytes) -> tuple[int, bytes]:
    """(domid, signature) from a PROOF message."""
    if len(data) != PROOF_SIZE:
        raise AuthError("truncated proof")
    domid, signature = _PROOF.unpack(data)
    return int(domid), bytes(signature)


def check_proof(
    lookup_pubkey: Callable[[int], str | None], challenge: bytes, data: bytes
) -> int | None:
    """The proven domid, or None if the proof must be refused (see the module docstring)."""
    domid, signature = parse_proof(data)
    if domid == 0 or domid >= DOMID_FIRST_RESERVED:
        return None
    public_hex = lookup_pubkey(domid)
    if public_hex is None:
        return None
    if not identity.verify(public_hex, domid, PURPOSE, challenge, signature):
        return None
    return domid


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int, buf: bytearray) -> bytes:
    """Read until `buf` holds `size` bytes; return them and keep any surplus in `buf`."""
    while len(buf) < size:
        data = await stream.receive_some(max(size - len(buf), 4096))
        if not data:
            raise AuthError("connection closed during the handshake")
        buf += data
    out = bytes(buf[:size])
    del buf[:size]
    return out


async def server_handshake(
    stream: trio.abc.Stream, lookup_pubkey: Callable[[int], str | None]
) -> tuple[int | None, bytes]:
    """Run the server side. Returns (domid or None if refused, bytes received after PROOF).

    Raises AuthError (or a trio stream error) when the peer breaks off; the caller applies
    the deadline and closes the stream.
    """
    challenge = identity.new_challenge()
    await stream.send_all(hello(challenge))
    buf = bytearray()
    data = await receive_exactly(stream, PROOF_SIZE, buf)
    domid = check_proof(lookup_pubkey, challenge, data)
    await stream.send_all(ACCEPTED if domid is not None else REFUSED)
    return domid, bytes(buf)


async def client_handshake(stream: trio.abc.Stream, key: DomainKey) -> None:
    """Run the client side; raises AuthError if the server refuses `key`."""
    buf = bytearray()
    challenge = parse_hello(await receive_exactly(stream, HELLO_SIZE, buf))
    await stream.send_all(proof(key, challenge))
    result = await receive_exactly(stream, 1, buf)
    if result != ACCEPTED:
        raise AuthError(f"xenstored refused the identity of domain {key.domid}")
