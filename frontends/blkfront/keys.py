"""What blkfront writes and reads in xenstore, as pure functions of the keys.

SETUP (backend in InitWait), Linux `talk_to_blkback` / `setup_blkring`:
- ring order = min(own maximum (4), backend `max-ring-page-order`, 0 if absent);
  queues = min(own maximum (4), backend `multi-queue-max-queues`, 1 if absent);
- order 0 writes `ring-ref`; order > 0 writes `ring-page-order` and `ring-ref0..N-1`;
- one queue: `ring-ref*` and `event-channel` in the device directory; several queues:
  `multi-queue-num-queues` there and `queue-N/{ring-ref*,event-channel}` per queue
  (`ring-page-order` stays at the top, as Linux writes it);
- `protocol` (the ABI of the guest: `arm-abi` for 16/64 KiB guests, as arm64 is the
  platform with those page sizes, `x86_64-abi` for 4 KiB guests, unless told otherwise) and
  `feature-persistent`.
CONNECT (backend Connected), Linux `blkfront_connect` / `blkfront_gather_backend_features`:
`sectors` (512-byte units, required), `info`, `sector-size`, `physical-sector-size`,
flush (`feature-flush-cache` → FLUSH_DISKCACHE, else `feature-barrier` → WRITE_BARRIER),
`feature-discard` (+ granularity, alignment, secure), `feature-persistent` (used only when
both ends offer it), `feature-max-indirect-segments` (used when > 11, capped at our own
maximum and at what 8 indirect pages describe).

Grant granules (docs/granule-extension.md), with `xenpv.granule`'s rules:
SETUP reads `max-grant-granule-order` (absent or junk → 0, as xenbus_read_unsigned) and
picks order = min(page order, own cap, backend maximum); the ring is
`granule.blk_ring_geometry` (ring-page-order raised to at least the granule order, granted
as whole granules: `ring-ref` when that is one granule of order > 0, `ring-ref0..N-1`
otherwise; order 0 is exactly the baseline above). `grant-granule-order` is written with the
ring keys when the order is above 0 or the backend advertised the extension (so a declining
frontend states 0); a frontend facing an old backend writes nothing. CONNECT checks the
backend's echo when there is one (a different order is a protocol error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from frontends.blkfront.core import Negotiated
from frontends.blkfront.errors import BlkfrontProtocolError
from xenpv import granule
from xenpv.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    SECTOR_SIZE,
    XEN_IO_PROTO_ABI_ARM,
    XEN_IO_PROTO_ABI_X86_64,
    VdiskInfo,
    blkif_protocol,
    max_indirect_segments_limit,
)
from xenpv.xenbus.keys import (
    BLK_MAX_INDIRECT_SEGMENTS,
    BLK_MAX_QUEUES,
    MAX_RING_PAGE_ORDER,
    UINT_MAX,
    ULLONG_MAX,
    KeyValueError,
    parse_flag,
    parse_uint,
)

SETUP_KEYS = ["max-ring-page-order", "multi-queue-max-queues", granule.BACKEND_MAX_KEY]
CONNECT_KEYS = [
    "sectors",
    "info",
    "sector-size",
    "physical-sector-size",
    "feature-flush-cache",
    "feature-barrier",
    "feature-discard",
    "discard-granularity",
    "discard-alignment",
    "discard-secure",
    "feature-persistent",
    "feature-max-indirect-segments",
    granule.FRONTEND_KEY,
]

Keys = Mapping[str, str | None]


@dataclass(frozen=True, slots=True)
class Wishes:
    """The frontend's own maxima (Linux module parameters)."""

    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    max_queues: int = BLK_MAX_QUEUES
    max_indirect_segments: int = BLK_MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    protocol: str = XEN_IO_PROTO_ABI_X86_64
    granule_order: int | None = None  # own cap: None = as large as allowed, 0 = decline


def default_protocol(page_size: int) -> str:
    """The ABI a guest of this page size names: 16/64 KiB pages exist on arm64 only."""
    return XEN_IO_PROTO_ABI_X86_64 if page_size == 4096 else XEN_IO_PROTO_ABI_ARM


def number(keys: Keys, name: str, default: int = 0, *, maximum: int = UINT_MAX) -> int:
    """`xenbus_read_unsigned`: a missing or unreadable key reads as `default`."""
    return parse_uint(keys.get(name), name, default=default, maximum=maximum)


def flag(keys: Keys, name: str) -> bool:
    """A backend feature: non-zero = on, missing or unreadable = off."""
    return parse_flag(keys.get(name), name)


@dataclass(frozen=True, slots=True)
class Geometry:
    ring_page_order: int
    queues: int
    granule_order: int = 0  # the grant-granule-order this connection uses
    granule_key: bool = False  # write grant-granule-order (see the module docstring)

    @property
    def grant_size(self) -> int:
        return granule.granule_size(self.granule_order)

    @property
    def ring_refs(self) -> int:
        """Grants per ring: the ring's bytes over the granule."""
        return 1 << (self.ring_page_order - self.granule_order)


def geometry(wishes: Wishes, backend: Keys, page_size: int = 4096) -> Geometry:
    advertised = backend.get(granule.BACKEND_MAX_KEY) is not None
    backend_max = min(number(backend, granule.BACKEND_MAX_KEY, 0), granule.MAX_GRANULE_ORDER)
    order = granule.frontend_choice(page_size, backend_max, wishes.granule_order)
    ring = min(wishes.max_ring_page_order, number(backend, "max-ring-page-order", 0))
    ring = granule.blk_ring_geometry(ring, order).ring_page_order
    queues = max(1, min(wishes.max_queues, number(backend, "multi-queue-max-queues", 1)))
    return Geometry(ring, queues, order, advertised or order > 0)


def is_ring_key(name: str) -> bool:
    """A key of the frontend directory that describes one connection's rings."""
    return name.startswith(("ring-ref", "queue-")) or name in (
        "ring-page-order",
        "multi-queue-num-queues",
        "event-channel",
        granule.FRONTEND_KEY,
    )


def setup_keys(
    geo: Geometry,
    ring_grefs: Sequence[Sequence[int]],
    ports: Sequence[int],
    wishes: Wishes,
) -> dict[str, str | int]:
    """The keys published with Initialised."""
    keys: dict[str, str | int] = {}
    if geo.ring_page_order:
        keys["ring-page-order"] = geo.ring_page_order

    def ring(prefix: str, grefs: Sequence[int], port: int) -> None:
        if geo.ring_page_order == 0 or (geo.granule_order and geo.ring_refs == 1):
            keys[f"{prefix}ring-ref"] = grefs[0]
        else:
            for i, gref in enumerate(grefs):
                keys[f"{prefix}ring-ref{i}"] = gref
        keys[f"{prefix}event-channel"] = port

    if geo.queues == 1:
        ring("", ring_grefs[0], ports[0])
    else:
        keys["multi-queue-num-queues"] = geo.queues
        for q in range(geo.queues):
            ring(f"queue-{q}/", ring_grefs[q], ports[q])
    keys["protocol"] = wishes.protocol
    keys["feature-persistent"] = int(wishes.persistent)
    if geo.granule_key:
        keys[granule.FRONTEND_KEY] = geo.granule_order
    return keys


def negotiated(
    wishes: Wishes, geo: Geometry, backend: Keys, *, handle: int, grant_size: int | None = None
) -> Negotiated:
    """Everything a connection uses, from the backend's Connected keys. The grant size is
    the geometry's granule (`grant_size`, if given, must agree with it)."""
    if grant_size is not None and grant_size != geo.grant_size:
        raise ValueError(f"grant size {grant_size} but granule order {geo.granule_order}")
    grant_size = geo.grant_size
    echo = backend.get(granule.FRONTEND_KEY)
    if echo is not None and number(backend, granule.FRONTEND_KEY, -1) != geo.granule_order:
        raise BlkfrontProtocolError(
            f"backend echoes {granule.FRONTEND_KEY} {echo.strip()[:20]!r}, "
            f"we use {geo.granule_order}"
        )
    try:  # blkfront_connect: xenbus_gather("%llu"), fatal when it fails
        sectors = parse_uint(backend.get("sectors"), "sectors", maximum=ULLONG_MAX)
    except KeyValueError as exc:
        raise BlkfrontProtocolError(f"backend wrote no usable 'sectors': {exc}") from None
    sector_size = number(backend, "sector-size", SECTOR_SIZE)
    if sector_size < SECTOR_SIZE or sector_size & (sector_size - 1) or sector_size > grant_size:
        raise BlkfrontProtocolError(f"backend sector-size {sector_size} is not usable")
    physical = number(backend, "physical-sector-size", sector_size) or sector_size
    info = VdiskInfo(number(backend, "info", 0) & 0x7)
    flush_op: int | None = None
    if flag(backend, "feature-flush-cache"):
        flush_op = int(BLKIF_OP_FLUSH_DISKCACHE)
    elif flag(backend, "feature-barrier"):
        flush_op = int(BLKIF_OP_WRITE_BARRIER)
    indirect = min(
        number(backend, "feature-max-indirect-segments"),
        wishes.max_indirect_segments,
        max_indirect_segments_limit(grant_size),
    )
    if indirect <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        indirect = 0
    return Negotiated(
        protocol=blkif_protocol(wishes.protocol),
        queues=geo.queues,
        ring_page_order=geo.ring_page_order,
        sectors=sectors,
        sector_size=sector_size,
        physical_sector_size=physical,
        read_only=bool(info & VdiskInfo.VDISK_READONLY),
        persistent=wishes.persistent and flag(backend, "feature-persistent"),
        indirect_segments=indirect,
        flush_op=flush_op,
        discard=flag(backend, "feature-discard"),
        discard_granularity=number(backend, "discard-granularity"),
        discard_alignment=number(backend, "discard-alignment"),
        discard_secure=flag(backend, "discard-secure"),
        grant_size=grant_size,
        handle=handle & 0xFFFF,
        granule_order=geo.granule_order,
    )
