"""The negotiated grant-granule extension (docs/granule-extension.md), sans-IO.

Both ends of a device call these functions: the backend to advertise and to accept, the
frontend to choose. Absent keys mean order 0, the 4 KiB baseline every end speaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenpv.errors import XenpvError
from xenpv.xenbus.keys import KeyValueError, parse_uint

XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT
MAX_GRANULE_ORDER = 4  # 64 KiB

# xenstore keys
BACKEND_MAX_KEY = "max-grant-granule-order"  # backend dir, before InitWait
FRONTEND_KEY = "grant-granule-order"  # frontend dir with the ring keys; echoed by the backend


class GranuleError(XenpvError):
    """A granule key holds something the other end cannot accept."""


def granule_size(order: int) -> int:
    return XEN_PAGE_SIZE << order


def page_order(page_size: int) -> int:
    """log2(page size / 4096) for 4 KiB, 16 KiB and 64 KiB pages."""
    order = (page_size >> XEN_PAGE_SHIFT).bit_length() - 1
    if page_size <= 0 or granule_size(order) != page_size:
        raise ValueError(f"page size {page_size} is not 4 KiB times a power of two")
    return order


def parse_order(raw: bytes | str | None, key: str) -> int:
    """Read an order key: absent → 0; anything but 0..4 → GranuleError naming the key."""
    try:
        return parse_uint(raw, key, default=0, strict=True, maximum=MAX_GRANULE_ORDER)
    except KeyValueError as exc:
        raise GranuleError(str(exc)) from None


def frontend_choice(page_size: int, backend_max: int, cap: int | None = None) -> int:
    """The order a frontend uses: min(its page order, its own cap, the backend's maximum).

    `cap` None means "as large as possible"; 0 means the frontend declines the extension.
    """
    order = min(page_order(page_size), backend_max, MAX_GRANULE_ORDER)
    if cap is not None:
        order = min(order, max(cap, 0))
    return order


def backend_accept(requested: int, backend_max: int) -> int:
    """The order a backend accepts: exactly what the frontend wrote, if within its maximum."""
    if requested > backend_max:
        raise GranuleError(f"{FRONTEND_KEY} {requested} exceeds {BACKEND_MAX_KEY} {backend_max}")
    return requested


@dataclass(frozen=True, slots=True)
class BlkRingGeometry:
    """How a vbd ring is granted under granule order `granule_order`."""

    ring_page_order: int  # what the frontend writes (ring bytes = 4096 << this)
    nr_refs: int  # ring-ref (1) or ring-ref0..N-1
    granule_order: int

    @property
    def ring_bytes(self) -> int:
        return XEN_PAGE_SIZE << self.ring_page_order


def blk_ring_geometry(wanted_ring_page_order: int, granule_order: int) -> BlkRingGeometry:
    """A ring is never smaller than one granule; it is granted as whole granules."""
    order = max(wanted_ring_page_order, granule_order)
    return BlkRingGeometry(order, 1 << (order - granule_order), granule_order)


def blk_max_ring_page_order(backend_max_ring_page_order: int, granule_order: int) -> int:
    """The largest ring-page-order a backend that accepted `granule_order` accepts."""
    return max(backend_max_ring_page_order, granule_order)


def sectors_per_granule(granule_order: int) -> int:
    return granule_size(granule_order) // 512


def indirect_descriptors_per_page(granule_order: int) -> int:
    return granule_size(granule_order) // 8


NETIF_RX_STATUS_MAX = 0x7FFF  # int16_t status: bytes per rx slot at most


def netif_rx_slot_capacity(granule_order: int, offset: int = 0) -> int:
    return min(granule_size(granule_order) - offset, NETIF_RX_STATUS_MAX)
