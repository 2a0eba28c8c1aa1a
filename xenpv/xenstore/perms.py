"""Node permissions (xenstore_lib.h `struct xs_permissions`, C `perm_for_conn`).

A node's permission list is never empty. The first entry names the owner and gives the
default access for every domain not listed afterwards; later entries grant a specific domain
`n` (none), `r` (read), `w` (write) or `b` (both). The owner, privileged connections (dom0)
and a domain that is the SET_TARGET device model of the owner get everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from xenpv.xenstore.wire import XsError

MAX_DOMID = 0xFFFF


class XsPerm(IntFlag):
    """enum xs_perm_type (xenstore_lib.h)."""

    XS_PERM_NONE = 0
    XS_PERM_READ = 1
    XS_PERM_WRITE = 2
    XS_PERM_ENOENT_OK = 4  # Internal use only
    XS_PERM_OWNER = 8


# Plain ints on the hot path (IntFlag arithmetic is slow).
READ = int(XsPerm.XS_PERM_READ)
WRITE = int(XsPerm.XS_PERM_WRITE)
OWNER = int(XsPerm.XS_PERM_OWNER)
ALL = READ | WRITE | OWNER

_LETTER_TO_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_BITS_TO_LETTER = {bits: letter for letter, bits in _LETTER_TO_BITS.items()}


@dataclass(frozen=True, slots=True)
class Perm:
    """One `xs_permissions` entry: access bits (READ/WRITE) for `domid`."""

    bits: int
    domid: int

    def __str__(self) -> str:
        return f"{_BITS_TO_LETTER[self.bits & 3]}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        """`"r5"` → Perm(READ, 5); anything else → XsError(EINVAL).

        C uses strtol and accepts junk such as `r0x5`; we accept decimal digits only.
        """
        if len(text) < 2 or text[0] not in _LETTER_TO_BITS or not text[1:].isdigit():
            raise XsError("EINVAL", f"bad permission {text[:32]!r}")
        domid = int(text[1:])
        if domid > MAX_DOMID or (len(text) > 2 and text[1] == "0"):
            raise XsError("EINVAL", f"bad permission {text[:32]!r}")
        return cls(_LETTER_TO_BITS[text[0]], domid)


Perms = tuple[Perm, ...]

DEFAULT_PERMS: Perms = (Perm(0, 0),)  # "n0": owned by dom0, nobody else may read


def parse_perms(texts: list[str]) -> Perms:
    if not texts:
        raise XsError("EINVAL", "empty permission list")
    return tuple(Perm.parse(t) for t in texts)


def perms_to_strings(perms: Perms) -> list[str]:
    return [str(p) for p in perms]


def perm_for(perms: Perms, domid: int, privileged: bool, target: int | None) -> int:
    """Access bits a connection of `domid` has on a node with `perms` (C `perm_for_conn`)."""
    owner = perms[0].domid
    if privileged or owner == domid or (target is not None and owner == target):
        return ALL
    for entry in perms[1:]:
        if entry.domid == domid or (target is not None and entry.domid == target):
            return entry.bits
    return perms[0].bits
