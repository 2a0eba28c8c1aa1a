"""The interop matrix, sans-IO: which cells exist and what each must negotiate.

A cell is one device between a guest (frontend page size) and a backend domain (backend page
size), with the grant-granule extension off or on, of one class (vbd or vif), with one set of
features. Rather than the full product of every feature, features are paired into profiles
(`VBD_PROFILES`, `VIF_PROFILES`); each cell's `features` dict states exactly which values it
covers:

- vbd "lean":  no indirect segments, single-page ring (order 0), no persistent grants, 1 queue
- vbd "full":  indirect (256 segments), 16-page ring (order 4), persistent grants, 4 queues
- vif "lean":  1 queue, plain frames (1514 bytes at most: no scatter-gather, no GSO)
- vif "full":  2 queues, scatter-gather + TCPv4 GSO (frames up to 64 KiB)

Extension off: the backend is configured to advertise max-grant-granule-order 0 and the
frontend declines (granule_order=0). On: the backend advertises 4 (64 KiB) and the frontend
picks as large as allowed (granule_order=None), so the agreed order must be
`granule.frontend_choice(frontend_page, 4)` = the guest's page order: the backend domain's own
page size never limits what it maps (docs/granule-extension.md, "Mixes").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from xenpv import granule

PAGE_SIZES: tuple[int, ...] = (4096, 16384, 65536)
DEVICES: tuple[str, ...] = ("vbd", "vif")
EXTENSION_MAX_ORDER = granule.MAX_GRANULE_ORDER  # what a backend advertises with the extension on

Device = Literal["vbd", "vif"]


@dataclass(frozen=True, slots=True)
class VbdProfile:
    name: str
    indirect_segments: int  # feature-max-indirect-segments offered (0 = off)
    ring_page_order: int  # max-ring-page-order offered (and what the frontend may use)
    persistent: bool
    queues: int

    def features(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "indirect": self.indirect_segments > 0,
            "indirect_segments": self.indirect_segments,
            "ring_page_order": self.ring_page_order,
            "persistent": self.persistent,
            "queues": self.queues,
        }


@dataclass(frozen=True, slots=True)
class VifProfile:
    name: str
    queues: int
    sg_gso: bool  # the traffic uses scatter-gather frames and TCPv4 GSO up to 64 KiB

    def features(self) -> dict[str, Any]:
        return {"profile": self.name, "queues": self.queues, "sg_gso": self.sg_gso}


VBD_PROFILES: tuple[VbdProfile, ...] = (
    VbdProfile("lean", indirect_segments=0, ring_page_order=0, persistent=False, queues=1),
    VbdProfile("full", indirect_segments=256, ring_page_order=4, persistent=True, queues=4),
)
VIF_PROFILES: tuple[VifProfile, ...] = (
    VifProfile("lean", queues=1, sg_gso=False),
    VifProfile("full", queues=2, sg_gso=True),
)


@dataclass(frozen=True, slots=True)
class Cell:
    frontend_page: int
    backend_page: int
    extension: bool
    device: Device
    profile: VbdProfile | VifProfile

    @property
    def key(self) -> str:
        """A stable identifier: `vbd-f64k-b4k-on-full`."""
        on = "on" if self.extension else "off"
        return (
            f"{self.device}-f{self.frontend_page >> 10}k-b{self.backend_page >> 10}k-"
            f"{on}-{self.profile.name}"
        )

    @property
    def backend_max_order(self) -> int:
        """What the backend advertises as max-grant-granule-order for this cell."""
        return EXTENSION_MAX_ORDER if self.extension else 0

    @property
    def frontend_granule_order(self) -> int | None:
        """What the cell passes to `attach(granule_order=...)`: None = as large as allowed."""
        return None if self.extension else 0

    @property
    def expected_order(self) -> int:
        """The order both ends must agree on."""
        if not self.extension:
            return 0
        return granule.frontend_choice(self.frontend_page, self.backend_max_order)

    def features(self) -> dict[str, Any]:
        return self.profile.features()


def enumerate_cells(
    frontend_pages: tuple[int, ...] = PAGE_SIZES,
    backend_pages: tuple[int, ...] = PAGE_SIZES,
    devices: tuple[str, ...] = DEVICES,
) -> list[Cell]:
    """Every cell, in report order: device, frontend page, backend page, profile, extension."""
    cells: list[Cell] = []
    for device in devices:
        profiles: tuple[VbdProfile | VifProfile, ...] = (
            VBD_PROFILES if device == "vbd" else VIF_PROFILES
        )
        for fe in frontend_pages:
            for be in backend_pages:
                for profile in profiles:
                    for extension in (False, True):
                        dev: Device = "vbd" if device == "vbd" else "vif"
                        cells.append(Cell(fe, be, extension, dev, profile))
    return cells


def speedup_pairs(cells: list[Cell]) -> list[tuple[Cell, Cell]]:
    """(4 KiB splitting, 64 KiB granules) pairs: a 64 KiB guest, same backend and profile."""
    by_key = {
        (c.device, c.frontend_page, c.backend_page, c.profile.name, c.extension): c for c in cells
    }
    pairs: list[tuple[Cell, Cell]] = []
    for c in cells:
        if c.frontend_page == 65536 and not c.extension:
            on = by_key.get((c.device, c.frontend_page, c.backend_page, c.profile.name, True))
            if on is not None:
                pairs.append((c, on))
    return pairs
