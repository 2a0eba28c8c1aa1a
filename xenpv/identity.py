"""Domain identity: how a process proves which domid it runs.

When the toolstack creates a domain it issues the domain's secret, an Ed25519 private key,
and publishes the public half in xenstore at `pubkey_path(domid)` (owned by dom0, readable by
every domain). A process proves it is domain N by signing a fresh challenge from its peer
(xenstored on TCP, or another domain's runtime on a domain link); the peer verifies the
signature against the published key. Signatures are bound to a purpose string so a signature
made for one protocol cannot be replayed on another.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from xenpv.errors import XenpvError

CHALLENGE_SIZE = 32
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32

# Xenstore layout owned by the toolstack (dom0): `/tool/xenpv/domain/<domid>/...`.
TOOL_DOMAIN_ROOT = "/tool/xenpv/domain"


def pubkey_path(domid: int) -> str:
    """Where the domain's public key (hex) lives in xenstore."""
    return f"{TOOL_DOMAIN_ROOT}/{domid}/pubkey"


def link_path(domid: int) -> str:
    """Where the domain's link endpoint (`unix:PATH` or `tcp:HOST:PORT`) lives in xenstore."""
    return f"{TOOL_DOMAIN_ROOT}/{domid}/link"


class IdentityError(XenpvError):
    """A key file is unreadable or malformed, or a proof of identity failed."""


def new_challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_SIZE)


def _signed_message(purpose: bytes, challenge: bytes, domid: int) -> bytes:
    return b"xenpv-identity\0" + purpose + b"\0" + domid.to_bytes(2, "little") + challenge


class DomainKey:
    """A domain's secret: signs challenges on behalf of `domid`."""

    __slots__ = ("_private", "domid")

    def __init__(self, domid: int, private: Ed25519PrivateKey) -> None:
        self.domid = domid
        self._private = private

    @classmethod
    def generate(cls, domid: int) -> DomainKey:
        return cls(domid, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed_hex(cls, domid: int, seed_hex: str) -> DomainKey:
        try:
            seed = bytes.fromhex(seed_hex.strip())
            return cls(domid, Ed25519PrivateKey.from_private_bytes(seed))
        except ValueError as exc:
            raise IdentityError(f"domain {domid}: malformed secret ({exc})") from None

    def seed_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization

        raw = self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return raw.hex()

    @classmethod
    def load(cls, path: Path) -> DomainKey:
        """Read a key file written by `save`: one line `<domid> <seed hex>`."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from None
        fields = text.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise IdentityError(f"key file {path}: expected '<domid> <seed hex>'")
        return cls.from_seed_hex(int(fields[0]), fields[1])

    def save(self, path: Path) -> None:
        """Write the key file with mode 0600 (it is the domain's secret)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.domid} {self.seed_hex()}\n")

    def public_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization

        return (
            self._private.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def sign(self, purpose: bytes, challenge: bytes) -> bytes:
        return self._private.sign(_signed_message(purpose, challenge, self.domid))


def verify(public_hex: str, domid: int, purpose: bytes, challenge: bytes, signature: bytes) -> bool:
    """True iff `signature` proves `domid` answered `challenge` for `purpose`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex.strip()))
        key.verify(signature, _signed_message(purpose, challenge, domid))
    except (ValueError, InvalidSignature):
        return False
    return True
