"""blkback's xenstore keys, as pure functions: the toolstack's, the handshake's.

Toolstack keys, read from the backend directory: `params`, `type`, `mode` as xl writes them,
and the `xenpv-*` keys of `xenpv.xenbus.keys` that stand in for Linux blkback's module
parameters (`max_ring_page_order`, `max_queues`, `max_indirect_segments`, `feature_persistent`)
and `xenpv-max-grant-granule-order` (the granule extension, docs/granule-extension.md: default
4, 0 = a baseline-only backend), one set per device so that frontends can meet every
combination. A missing `xenpv-*` key means Linux's default; a malformed one is a `ConfigError`
(the device cannot be served until the toolstack fixes it).

Handshake keys. ADVERTISE (backend → InitWait), in xen_blkbk_probe's order:
`feature-max-indirect-segments` (only when indirect requests are offered: blkif.h says a
backend that does not recognise BLKIF_OP_INDIRECT must not create it),
`multi-queue-max-queues`, `max-ring-page-order`, and `feature-persistent` (recent Linux
writes it again at connect; we write it at both steps).

CONNECT reads the frontend's keys as `connect_ring` / `read_per_ring_refs` do:
- `protocol`: missing → native (x86_64-abi); unknown → fatal;
- `feature-persistent`: read as xenbus_read_unsigned (missing or junk → 0);
- `multi-queue-num-queues`: default 1; 0 or above what we offered → fatal;
- `ring-page-order` from the frontend's top directory (also with several queues): present →
  `ring-ref0..N-1` in each queue's directory, above what we offered → fatal; absent → a
  single `ring-ref`;
- `event-channel` in each queue's directory (`queue-N/` when there are several queues).
and then publishes, in `connect()`'s order: `feature-flush-cache`, the discard keys,
`feature-barrier`, `feature-persistent`, `sectors` (512-byte units, whatever the sector
size, as `vbd_sz`), `info`, `sector-size`, `physical-sector-size`. Features that are off are
written as 0 rather than left out, so a key left by a previous backend instance with another
configuration cannot mislead the frontend; frontends treat 0 and absent alike.

Grant granules (docs/granule-extension.md): ADVERTISE also writes
`max-grant-granule-order` (the toolstack's `xenpv-max-grant-granule-order`, default 4; 0 is
written rather than left out, for the same reason as the features above). CONNECT reads the
frontend's `grant-granule-order` (absent → 0; junk or above our maximum → fatal: we never
guess a smaller order, the frontend's grants would not match), accepts `ring-page-order` up
to max(max-ring-page-order, granule order) and at least the granule order (a ring is never
smaller than one granule), and reads the ring as 2^(ring-page-order - granule order)
granule grants: `ring-ref` when that is one granule of a granule order above 0,
`ring-ref0..N-1` otherwise (order 0 keeps the baseline: `ring-page-order` present means
`ring-ref0..`). Connected echoes `grant-granule-order`.

`feature-large-sector-size` is a *frontend* key (blkif.h); like Linux blkback we neither
require nor read it: sector-based quantities on the ring stay in 512-byte units and requests
on a 4096-byte-sector disk must be aligned to 8 of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from backends.storage import StorageInfo
from xenpv.abi.blkif import (
    BlkifProtocol,
    VdiskInfo,
    blkif_protocol,
    max_indirect_segments_limit,
)
from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import BlkifError
from xenpv.errors import XenpvError
from xenpv.granule import (
    BACKEND_MAX_KEY,
    FRONTEND_KEY,
    MAX_GRANULE_ORDER,
    GranuleError,
    backend_accept,
    blk_max_ring_page_order,
    parse_order,
)
from xenpv.xenbus import keys as xk
from xenpv.xenbus.keys import KeyValueError, parse_flag, parse_uint

# -- toolstack keys -----------------------------------------------------------------------

# xen_blkif_max_pgrants: persistently mapped grants per ring before falling back to copies.
MAX_PERSISTENT_GRANTS: Final = 1056

CONFIG_KEYS: Final = (
    "params",
    "type",
    "mode",
    xk.XENPV_SIZE,
    xk.XENPV_SECTOR_SIZE,
    xk.XENPV_MAX_RING_PAGE_ORDER,
    xk.XENPV_MAX_QUEUES,
    xk.XENPV_MAX_INDIRECT_SEGMENTS,
    xk.XENPV_PERSISTENT,
    xk.XENPV_FLUSH,
    xk.XENPV_BARRIER,
    xk.XENPV_DISCARD,
    xk.XENPV_MAX_GRANULE_ORDER,
)
MAX_DISK_SIZE: Final = 1 << 62  # bytes: `xenpv-size` above this is a typo, not a disk

Keys = Mapping[str, str | None]


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
    max_ring_page_order: int = xk.MAX_RING_PAGE_ORDER
    max_queues: int = xk.BLK_MAX_QUEUES
    max_indirect_segments: int = xk.BLK_MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    max_granule_order: int = MAX_GRANULE_ORDER  # max-grant-granule-order we advertise


def _setting(keys: Keys, name: str, default: int, lo: int, hi: int) -> int:
    """A numeric `xenpv-*` key: absent = `default`, unreadable or outside lo..hi = ConfigError."""
    try:
        return parse_uint(
            keys.get(name), name, default=default, strict=True, minimum=lo, maximum=hi
        )
    except KeyValueError as exc:
        raise ConfigError(str(exc)) from None


def _switch(keys: Keys, name: str) -> bool:
    """An on/off `xenpv-*` key: absent = on (Linux's default), unreadable = ConfigError."""
    try:
        return parse_flag(keys.get(name), name, default=True, strict=True)
    except KeyValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_config(keys: Keys, granule: int = XEN_PAGE_SIZE) -> BackendConfig:
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
    sector_size = _setting(keys, xk.XENPV_SECTOR_SIZE, 512, 512, 4096)
    if sector_size not in (512, 4096):
        raise ConfigError(f"{xk.XENPV_SECTOR_SIZE}={sector_size}: want 512 or 4096")
    size: int | None = None
    if keys.get(xk.XENPV_SIZE) is not None:
        size = _setting(keys, xk.XENPV_SIZE, 0, 0, MAX_DISK_SIZE)
        if size % sector_size:
            raise ConfigError(f"{xk.XENPV_SIZE}={size} is not a multiple of {sector_size}")
    if kind == "memory" and size is None:
        raise ConfigError(f"a memory disk needs {xk.XENPV_SIZE}")
    max_order = xk.MAX_RING_PAGE_ORDER
    return BackendConfig(
        kind=kind,
        path=path,
        size=size,
        sector_size=sector_size,
        read_only="w" not in mode,
        max_ring_page_order=_setting(keys, xk.XENPV_MAX_RING_PAGE_ORDER, max_order, 0, max_order),
        max_queues=_setting(keys, xk.XENPV_MAX_QUEUES, xk.BLK_MAX_QUEUES, 1, xk.BLK_MAX_QUEUES),
        max_indirect_segments=_setting(
            keys,
            xk.XENPV_MAX_INDIRECT_SEGMENTS,
            xk.BLK_MAX_INDIRECT_SEGMENTS,
            0,
            max_indirect_segments_limit(granule),
        ),
        persistent=_switch(keys, xk.XENPV_PERSISTENT),
        flush=_switch(keys, xk.XENPV_FLUSH),
        barrier=_switch(keys, xk.XENPV_BARRIER),
        discard=_switch(keys, xk.XENPV_DISCARD),
        max_granule_order=_setting(
            keys, xk.XENPV_MAX_GRANULE_ORDER, MAX_GRANULE_ORDER, 0, MAX_GRANULE_ORDER
        ),
    )


# -- handshake keys -----------------------------------------------------------------------

KeyValues = dict[str, str | int | bytes]


class NegotiationError(XenpvError):
    """The frontend published keys a backend cannot connect with (Linux: xenbus_dev_fatal)."""


@dataclass(frozen=True, slots=True)
class QueueParams:
    """One queue's ring: its grant references (one per ring granule) and event channel."""

    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True, slots=True)
class FrontendParams:
    """What the frontend asked for, validated against what the backend offered."""

    protocol: BlkifProtocol
    ring_page_order: int
    persistent: bool  # both ends want persistent grants
    queues: tuple[QueueParams, ...]
    cdrom: bool = False
    granule_order: int = 0  # the accepted grant-granule-order (0: 4 KiB baseline)


@dataclass(frozen=True, slots=True)
class DeviceFeatures:
    """What the backend publishes at connect and then enforces on every request."""

    flush: bool
    barrier: bool
    discard: bool
    discard_secure: bool
    persistent: bool


def advertise_keys(config: BackendConfig) -> KeyValues:
    """The keys written with InitWait."""
    keys: KeyValues = {}
    if config.max_indirect_segments > 0:
        keys["feature-max-indirect-segments"] = config.max_indirect_segments
    keys["multi-queue-max-queues"] = config.max_queues
    keys["max-ring-page-order"] = config.max_ring_page_order
    keys["feature-persistent"] = int(config.persistent)
    keys[BACKEND_MAX_KEY] = config.max_granule_order
    return keys


def device_features(config: BackendConfig, info: StorageInfo) -> DeviceFeatures:
    """The device's features: the toolstack's offer intersected with the disk's abilities."""
    flush = config.flush and info.flush and not info.read_only
    discard = config.discard and info.discard and not info.read_only
    return DeviceFeatures(
        flush=flush,
        # Linux: feature-barrier = flush support; a barrier is drain + write + fdatasync.
        barrier=config.barrier and flush,
        discard=discard,
        discard_secure=discard and info.discard_secure,
        persistent=config.persistent,
    )


def connect_keys(
    info: StorageInfo, features: DeviceFeatures, *, cdrom: bool = False, granule_order: int = 0
) -> KeyValues:
    """The keys written with Connected (and again, `sectors`, on a capacity change)."""
    keys: KeyValues = {"feature-flush-cache": int(features.flush)}
    if features.discard:
        keys["discard-granularity"] = info.discard_granularity
        keys["discard-alignment"] = info.discard_alignment
        keys["discard-secure"] = int(features.discard_secure)
    keys["feature-discard"] = int(features.discard)
    keys["feature-barrier"] = int(features.barrier)
    keys["feature-persistent"] = int(features.persistent)
    keys["sectors"] = info.sectors
    vdisk = VdiskInfo(0)
    if cdrom:
        vdisk |= VdiskInfo.VDISK_CDROM
    if info.read_only:
        vdisk |= VdiskInfo.VDISK_READONLY
    keys["info"] = int(vdisk)
    keys["sector-size"] = info.sector_size
    keys["physical-sector-size"] = info.physical_sector_size
    keys[FRONTEND_KEY] = granule_order  # the echo: both ends state what was agreed
    return keys


def _scan(raw: str | None, name: str) -> int:
    """A key the backend cannot do without (xenbus_scanf "%u"): missing or junk is fatal."""
    try:
        return parse_uint(raw, name)
    except KeyValueError as exc:
        raise NegotiationError(str(exc)) from None


def queue_dirs(num_queues: int) -> list[str]:
    """Where each queue's keys live, relative to the frontend directory ("" = the top)."""
    return [""] if num_queues == 1 else [f"queue-{i}/" for i in range(num_queues)]


def requested_queues(keys: Keys, config: BackendConfig) -> int:
    """`multi-queue-num-queues` (default 1), checked against what we offered."""
    n = parse_uint(keys.get("multi-queue-num-queues"), "multi-queue-num-queues", default=1)
    if n == 0 or n > config.max_queues:
        raise NegotiationError(
            f"guest requested {n} queues, exceeding the maximum of {config.max_queues}"
        )
    return n


def ring_ref_names(prefix: str, ring_page_order: int | None, granule_order: int) -> list[str]:
    """The ring grant keys of one queue directory (see the module docstring)."""
    if ring_page_order is None:
        return [f"{prefix}ring-ref"]
    count = 1 << (ring_page_order - granule_order)
    if granule_order and count == 1:
        return [f"{prefix}ring-ref"]
    return [f"{prefix}ring-ref{i}" for i in range(count)]


def frontend_key_names(
    num_queues: int, ring_page_order: int | None, granule_order: int = 0
) -> list[str]:
    """Every key `parse_frontend` may need, relative to the frontend directory."""
    names = ["protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order"]
    names += ["device-type", FRONTEND_KEY]
    for prefix in queue_dirs(num_queues):
        names.append(f"{prefix}event-channel")
        names += ring_ref_names(prefix, ring_page_order, granule_order)
    return names


def requested_granule(keys: Keys, config: BackendConfig) -> int:
    """`grant-granule-order` (absent → 0), checked against our `max-grant-granule-order`."""
    try:
        return backend_accept(
            parse_order(keys.get(FRONTEND_KEY), FRONTEND_KEY), config.max_granule_order
        )
    except GranuleError as exc:
        raise NegotiationError(str(exc)) from None


def requested_order(keys: Keys, config: BackendConfig, granule_order: int = 0) -> int | None:
    """`ring-page-order` (None when absent: a single `ring-ref`), checked against our offer
    (widened to the granule order) and against the granule (a ring holds whole granules)."""
    raw = keys.get("ring-page-order")
    limit = blk_max_ring_page_order(config.max_ring_page_order, granule_order)
    if raw is None:
        if granule_order:
            raise NegotiationError(
                f"no ring-page-order with {FRONTEND_KEY} {granule_order}: "
                "a ring is at least one granule"
            )
        return None
    order = _scan(raw, "ring-page-order")
    if order > limit:
        raise NegotiationError(f"requested ring page order {order} exceeds max:{limit}")
    if order < granule_order:
        raise NegotiationError(
            f"ring-page-order {order} is smaller than {FRONTEND_KEY} {granule_order}"
        )
    return order


def parse_frontend(keys: Keys, config: BackendConfig) -> FrontendParams:
    """Validate the frontend's keys (as read from its directory) into connection parameters."""
    raw_protocol = keys.get("protocol")
    try:
        protocol = blkif_protocol((raw_protocol or "").strip() or None)
    except BlkifError:
        raise NegotiationError(f"unknown fe protocol {raw_protocol!r:.60}") from None
    persistent = parse_flag(keys.get("feature-persistent"), "feature-persistent")
    num_queues = requested_queues(keys, config)
    granule_order = requested_granule(keys, config)
    order = requested_order(keys, config, granule_order)
    queues = []
    for prefix in queue_dirs(num_queues):
        evtchn = _scan(keys.get(f"{prefix}event-channel"), f"{prefix}event-channel")
        refs = tuple(
            _scan(keys.get(name), name) for name in ring_ref_names(prefix, order, granule_order)
        )
        queues.append(QueueParams(refs, evtchn))
    return FrontendParams(
        protocol=protocol,
        ring_page_order=order or 0,
        persistent=persistent and config.persistent,
        queues=tuple(queues),
        cdrom=(keys.get("device-type") or "").strip() == "cdrom",
        granule_order=granule_order,
    )
