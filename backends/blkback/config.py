"""What the toolstack configured for one vbd: storage and the features the backend offers.

Read from the backend directory (`xenpv.toolstack.devices` writes these keys): `params`, `type`,
`mode`
as xl writes them, and the `xenpv-*` keys that stand in for Linux blkback's module
parameters (`max_ring_page_order`, `max_queues`, `max_indirect_segments`,
`feature_persistent`) and `xenpv-max-grant-granule-order` (the granule extension, issue 8,
docs/granule-extension.md: default 4, 0 = a baseline-only backend),
one set per device so that frontends can meet every combination.
A missing `xenpv-*` key means Linux's default; a malformed one is a `ConfigError` (the
device cannot be served until the toolstack fixes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from xenpv.abi.blkif import max_indirect_segments_limit
from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.errors import XenpvError
from xenpv.granule import MAX_GRANULE_ORDER
from xenpv.toolstack import devices

# Linux blkback's limits (xen-blkback/common.h, xenbus.c; XENBUS_MAX_RING_GRANT_ORDER).
MAX_RING_PAGE_ORDER: Final = 4
MAX_QUEUES: Final = 4
MAX_INDIRECT_SEGMENTS: Final = 256
# xen_blkif_max_pgrants: persistently mapped grants per ring before falling back to copies.
MAX_PERSISTENT_GRANTS: Final = 1056

CONFIG_KEYS: Final = (
    "params",
    "type",
    "mode",
    devices.VBD_SIZE,
    devices.VBD_SECTOR_SIZE,
    devices.VBD_MAX_RING_PAGE_ORDER,
    devices.VBD_MAX_QUEUES,
    devices.VBD_MAX_INDIRECT_SEGMENTS,
    devices.VBD_PERSISTENT,
    devices.VBD_FLUSH,
    devices.VBD_BARRIER,
    devices.VBD_DISCARD,
    devices.VBD_MAX_GRANULE_ORDER,
)


class ConfigError(XenpvError):
    """The toolstack's keys for a vbd cannot be served as written."""


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One vbd's storage and offered features (the toolstack's choice, not negotiated yet)."""

    kind: Literal["file", "memory"] = "memory"
    path: str = ""  # `params` for a file
    size: int | None = None  # `xenpv-size` in bytes: creation size of a missing image
    sector_size: int = 512
    read_only: bool = False
    max_ring_page_order: int = MAX_RING_PAGE_ORDER
    max_queues: int = MAX_QUEUES
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    max_granule_order: int = MAX_GRANULE_ORDER  # max-grant-granule-order we advertise


def _uint(keys: Mapping[str, str | None], name: str, default: int, lo: int, hi: int) -> int:
    raw = keys.get(name)
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not text.isdigit():
        raise ConfigError(f"{name}={raw!r} is not an unsigned integer")
    value = int(text)
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} outside {lo}..{hi}")
    return value


def _flag(keys: Mapping[str, str | None], name: str, default: bool) -> bool:
    raw = keys.get(name)
    if raw is None or raw == "":
        return default
    if raw.strip() not in ("0", "1"):
        raise ConfigError(f"{name}={raw!r} is not 0 or 1")
    return raw.strip() == "1"


def parse_config(keys: Mapping[str, str | None], granule: int = XEN_PAGE_SIZE) -> BackendConfig:
    """Build the configuration from the backend directory's keys (missing key = None)."""
    kind_raw = (keys.get("type") or "").strip()
    path = (keys.get("params") or "").strip()
    if kind_raw in ("", "file", "phy", "raw") and path:
        kind: Literal["file", "memory"] = "file"
    elif kind_raw == "memory" or (kind_raw == "" and not path):
        kind = "memory"
    else:
        raise ConfigError(f"type={kind_raw!r} with params={path!r}: want a file or memory")
    mode = (keys.get("mode") or "w").strip()
    sector_size = _uint(keys, devices.VBD_SECTOR_SIZE, 512, 512, 4096)
    if sector_size not in (512, 4096):
        raise ConfigError(f"{devices.VBD_SECTOR_SIZE}={sector_size}: want 512 or 4096")
    size: int | None = _uint(keys, devices.VBD_SIZE, -1, 0, 1 << 62)
    if size == -1:
        size = None
    elif size is not None and size % sector_size:
        raise ConfigError(f"{devices.VBD_SIZE}={size} is not a multiple of {sector_size}")
    if kind == "memory" and size is None:
        raise ConfigError(f"a memory disk needs {devices.VBD_SIZE}")
    return BackendConfig(
        kind=kind,
        path=path,
        size=size,
        sector_size=sector_size,
        read_only="w" not in mode,
        max_ring_page_order=_uint(
            keys, devices.VBD_MAX_RING_PAGE_ORDER, MAX_RING_PAGE_ORDER, 0, MAX_RING_PAGE_ORDER
        ),
        max_queues=_uint(keys, devices.VBD_MAX_QUEUES, MAX_QUEUES, 1, MAX_QUEUES),
        max_indirect_segments=_uint(
            keys,
            devices.VBD_MAX_INDIRECT_SEGMENTS,
            MAX_INDIRECT_SEGMENTS,
            0,
            max_indirect_segments_limit(granule),
        ),
        persistent=_flag(keys, devices.VBD_PERSISTENT, True),
        flush=_flag(keys, devices.VBD_FLUSH, True),
        barrier=_flag(keys, devices.VBD_BARRIER, True),
        discard=_flag(keys, devices.VBD_DISCARD, True),
        max_granule_order=_uint(
            keys, devices.VBD_MAX_GRANULE_ORDER, MAX_GRANULE_ORDER, 0, MAX_GRANULE_ORDER
        ),
    )
