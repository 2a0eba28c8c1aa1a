"""The xenstore key contract shared by the four drivers and the toolstack.

Numbers. Linux reads every numeric key with `xenbus_scanf(..., "%u")` (or `xenbus_read_unsigned`,
which is the same scan with a default). Its `vsscanf` skips leading white space, then takes one
or more decimal digits and stops at the first character that is not one; no sign, no base
prefix. So "  12", "12\\n" and even "12abc" read as 12, while "", "abc", "-1", "+1" and "0x10"
do not read at all. `parse_uint` follows that grammar exactly, with one deviation: a value
above `maximum` (2^32 - 1 unless the key is 64-bit, like `sectors` or `xenpv-size`) is refused,
where Linux would silently keep the low 32 bits (4294967297 would read as 1).

Linux uses the scan two ways, and so do we (`default`):
- xenbus_scanf: the key must be there and readable, else the device fails (`xenbus_dev_fatal`):
  `parse_uint(raw, key)` raises `KeyValueError`.
- xenbus_read_unsigned(dir, key, default): absent or unreadable reads as `default`:
  `parse_uint(raw, key, default=n)`; pass `strict=True` as well when only *absence* may fall
  back (the toolstack's `xenpv-*` keys: a typo there is the operator's error, not a default).

Flags (`feature-*`, the toolstack's on/off keys) are numbers read as "non-zero = on", as every
Linux driver reads its features (`xenbus_read_unsigned(...) != 0`): `parse_flag`. Writers
always write 0 or 1 (`flag`).

Limits. What Linux's drivers allow at most: a ring of 2^4 pages (XENBUS_MAX_RING_GRANT_ORDER),
4 block queues and 256 indirect segments (blkfront's module-parameter defaults and blkback's
caps), 8 netfront queues (xennet_max_queues). Both ends and the toolstack validate against these.

Toolstack keys. Keys starting with `xenpv-` are xenpv's toolstack-to-driver configuration (what
Linux takes from module parameters): which features a backend offers for one device, so that
frontends can meet every combination. `xenpv.toolstack.devices` writes them, the drivers read
them; neither side spells the names itself.
"""

from __future__ import annotations

import re
from typing import Final

from xenpv.errors import XenpvError

UINT_MAX: Final = 0xFFFF_FFFF  # `%u`
ULLONG_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF  # `%llu` (blkfront reads `sectors` this way)

# -- Linux limits ------------------------------------------------------------------------
MAX_RING_PAGE_ORDER: Final = 4  # XENBUS_MAX_RING_GRANT_ORDER: 16 pages per ring
BLK_MAX_QUEUES: Final = 4  # blkfront xen_blkif_max_queues / blkback xenblk_max_queues
BLK_MAX_INDIRECT_SEGMENTS: Final = 256  # blkfront xen_blkif_max_segments default
NET_MAX_QUEUES: Final = 8  # netfront xennet_max_queues default cap

# -- toolstack → driver keys (`xenpv-*`) ---------------------------------------------------
XENPV_SIZE: Final = "xenpv-size"  # vbd: disk size in bytes (creation size of an image)
XENPV_SECTOR_SIZE: Final = "xenpv-sector-size"  # vbd: 512 or 4096
XENPV_MAX_RING_PAGE_ORDER: Final = "xenpv-max-ring-page-order"  # vbd
XENPV_MAX_QUEUES: Final = "xenpv-max-queues"  # vbd and vif
XENPV_MAX_INDIRECT_SEGMENTS: Final = "xenpv-max-indirect-segments"  # vbd, 0 = off
XENPV_PERSISTENT: Final = "xenpv-persistent"  # vbd flag
XENPV_FLUSH: Final = "xenpv-flush"  # vbd flag
XENPV_BARRIER: Final = "xenpv-barrier"  # vbd flag
XENPV_DISCARD: Final = "xenpv-discard"  # vbd flag
# vbd and vif: the largest max-grant-granule-order to advertise (docs/granule-extension.md)
XENPV_MAX_GRANULE_ORDER: Final = "xenpv-max-grant-granule-order"
XENPV_TAP: Final = "xenpv-tap"  # vif, frontend directory: attach this host TAP to netfront
# both directories: a token new with every attach, so that a device detached and attached
# again under the same id is a new device to the domain runtime (watches coalesce)
XENPV_INSTANCE: Final = "xenpv-instance"
# backend directory, written by the toolstack: "0" once it asked the device to go (hot-unplug)
ONLINE: Final = "online"
XENPV_NBD: Final = "xenpv-nbd"  # vbd, frontend directory: export this disk over NBD there

# Leading white space as the kernel's isspace() sees it, then the digits `%u` takes.
_UINT = re.compile(r"[ \t\n\v\f\r]*([0-9]+)")


class KeyValueError(XenpvError):
    """A xenstore key is missing or unreadable where the reader needs it (xenbus_dev_fatal)."""

    def __init__(self, key: str, raw: str | bytes | None, why: str) -> None:
        shown = "missing" if raw is None else f"{raw[:40]!r}"
        super().__init__(f"reading {key}: {shown} {why}".rstrip())
        self.key = key
        self.raw = raw


def parse_uint(
    raw: str | bytes | None,
    key: str,
    *,
    default: int | None = None,
    strict: bool = False,
    minimum: int = 0,
    maximum: int = UINT_MAX,
) -> int:
    """The value of a numeric key as Linux's `%u` scan reads it (see the module docstring).

    `raw` None means the key is absent. With no `default`, absent or unreadable raises
    `KeyValueError` (xenbus_scanf); with one, absent reads as it, and so does unreadable unless
    `strict` (xenbus_read_unsigned). A number outside `minimum`..`maximum` is unreadable.
    """
    if raw is None:
        if default is None:
            raise KeyValueError(key, raw, "")
        return default
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    match = _UINT.match(text)
    if match is None:
        if default is None or strict:
            raise KeyValueError(key, raw, "is not an unsigned integer")
        return default
    value = int(match.group(1))
    if not minimum <= value <= maximum:
        if default is None or strict:
            raise KeyValueError(key, raw, f"is outside {minimum}..{maximum}")
        return default
    return value


def parse_flag(
    raw: str | bytes | None, key: str, *, default: bool = False, strict: bool = False
) -> bool:
    """A feature or on/off key: a number, non-zero = on (`xenbus_read_unsigned(...) != 0`).

    Absent reads as `default`; unreadable too, unless `strict` (then `KeyValueError`)."""
    return parse_uint(raw, key, default=int(default), strict=strict) != 0


def flag(value: bool) -> int:
    """How a flag is written: 1 or 0, never left out (a stale key could otherwise mislead)."""
    return 1 if value else 0
