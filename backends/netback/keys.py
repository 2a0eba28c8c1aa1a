"""The vif handshake's data, sans-IO: what netback advertises and what it reads back.

Advertise (Linux `netback_probe`, same keys and order): `feature-sg`, `feature-gso-tcpv4`,
`feature-gso-tcpv6`, `feature-ipv6-csum-offload`, `feature-rx-copy`, `feature-rx-flip`=0,
`feature-split-event-channels`, `multi-queue-max-queues`, `feature-ctrl-ring` = 1 (the
control ring's hash requests, `xenpv.abi.netif_ctrl`). xenpv does not implement multicast
control (`feature-multicast-control` is not written;
MCAST_ADD/DEL extras are still accepted and recorded, as netback does). With the grant-granule
extension (docs/granule-extension.md) it also advertises `max-grant-granule-order` (the toolstack
may lower it per device with `xenpv-max-grant-granule-order` in the backend directory, and set
`multi-queue-max-queues` with `xenpv-max-queues`; both read as blkback reads its `xenpv-*`
keys: absent = the default, junk = refused).

Connect (Linux `connect` / `connect_data_rings` / `read_xenbus_vif_flags`): the frontend keys
are parsed into a `FrontendConfig`; anything netback refuses is a `NetbackConfigError`
(Linux: `xenbus_dev_fatal`, the backend goes to Closing):
- `multi-queue-num-queues` (default 1) above the advertised maximum, or 0;
- `request-rx-copy` not 1 ("frontend does not support rx-copy"), since rx-flip is gone;
- missing or non-numeric `tx-ring-ref` / `rx-ring-ref`, or no event channel: either
  `event-channel-tx` + `event-channel-rx` (split) or `event-channel`;
- a `grant-granule-order` that is not a number 0..4 or exceeds the advertised maximum (never
  guessed down: the frontend's grants would not match).
With one queue the ring keys are in the frontend directory itself, with several in
`queue-<n>/`. Numbers and flags follow `xenpv.xenbus.keys`: flags are
`xenbus_read_unsigned(..., 0) != 0` (missing or junk = off).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from backends.netback.offload import RxOffload
from xenpv import granule
from xenpv.errors import XenpvError
from xenpv.xenbus.keys import (
    NET_MAX_QUEUES,
    XENPV_MAX_GRANULE_ORDER,
    XENPV_MAX_QUEUES,
    KeyValueError,
    parse_flag,
    parse_uint,
)

DEFAULT_MAX_QUEUES: Final = 4  # Linux: the number of online CPUs

# Frontend keys read once per connection (top level).
FRONTEND_FLAGS: Final = (
    "multi-queue-num-queues",
    "request-rx-copy",
    "feature-rx-notify",
    "feature-sg",
    "feature-gso-tcpv4",
    "feature-gso-tcpv6",
    "feature-no-csum-offload",
    "feature-ipv6-csum-offload",
    granule.FRONTEND_KEY,
)
# Per-queue keys (top level with one queue, under queue-<n>/ otherwise).
QUEUE_KEYS: Final = (
    "tx-ring-ref",
    "rx-ring-ref",
    "event-channel",
    "event-channel-tx",
    "event-channel-rx",
)


class NetbackConfigError(XenpvError):
    """The frontend's keys cannot be served (netback would call xenbus_dev_fatal)."""


def advertise_keys(
    max_queues: int = DEFAULT_MAX_QUEUES, max_granule_order: int | None = None
) -> dict[str, int]:
    """The backend's feature keys, in netback_probe's order; then `max-grant-granule-order`
    unless `max_granule_order` is None (a backend without the extension)."""
    keys = {
        "feature-sg": 1,
        "feature-gso-tcpv4": 1,
        "feature-gso-tcpv6": 1,
        "feature-ipv6-csum-offload": 1,
        "feature-rx-copy": 1,
        "feature-rx-flip": 0,
        "feature-split-event-channels": 1,
        "multi-queue-max-queues": max_queues,
        "feature-ctrl-ring": 1,
    }
    if max_granule_order is not None:
        keys[granule.BACKEND_MAX_KEY] = max_granule_order
    return keys


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """One queue's rings and event channel(s) as the frontend published them."""

    tx_ring_ref: int
    rx_ring_ref: int
    evtchn_tx: int
    evtchn_rx: int  # equal to evtchn_tx when the frontend uses one channel

    @property
    def split(self) -> bool:
        return self.evtchn_tx != self.evtchn_rx


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    queues: tuple[QueueConfig, ...]
    can_sg: bool
    rx_notify: bool
    offload: RxOffload
    granule_order: int = 0  # the accepted grant-granule-order (0: 4 KiB baseline)

    @property
    def granule(self) -> int:
        """The negotiated grant size in bytes."""
        return granule.granule_size(self.granule_order)


def _flag(keys: Mapping[str, str | None], name: str) -> bool:
    """A frontend feature: non-zero = on, missing or unreadable = off."""
    return parse_flag(keys.get(name), name)


def _required(keys: Mapping[str, str | None], name: str, where: str) -> int:
    """A key netback cannot do without (xenbus_scanf "%u"): missing or junk is fatal."""
    try:
        return parse_uint(keys.get(name), f"{where}/{name}")
    except KeyValueError as exc:
        raise NetbackConfigError(str(exc)) from None


def toolstack_setting(raw: str | bytes | None, name: str, default: int, lo: int, hi: int) -> int:
    """A numeric `xenpv-*` key of the backend directory (the same rule as blkback's): absent =
    `default`, unreadable or outside lo..hi = NetbackConfigError."""
    try:
        return parse_uint(raw, name, default=default, strict=True, minimum=lo, maximum=hi)
    except KeyValueError as exc:
        raise NetbackConfigError(str(exc)) from None


def queue_dirs(frontend: str, num_queues: int) -> list[str]:
    """Where each queue's keys live."""
    if num_queues == 1:
        return [frontend]
    return [f"{frontend}/queue-{n}" for n in range(num_queues)]


def parse_num_queues(value: str | None, max_queues: int) -> int:
    requested = parse_uint(value, "multi-queue-num-queues", default=1)
    if requested == 0:
        raise NetbackConfigError("guest requested 0 queues")
    if requested > max_queues:
        raise NetbackConfigError(
            f"guest requested {requested} queues, exceeding the maximum of {max_queues}."
        )
    return requested


def parse_queue(keys: Mapping[str, str | None], where: str) -> QueueConfig:
    tx = _required(keys, "tx-ring-ref", where)
    rx = _required(keys, "rx-ring-ref", where)
    if keys.get("event-channel-tx") is not None:
        evtchn_tx = _required(keys, "event-channel-tx", where)
        evtchn_rx = _required(keys, "event-channel-rx", where)
    else:
        evtchn_tx = evtchn_rx = _required(keys, "event-channel", where)
    return QueueConfig(tx, rx, evtchn_tx, evtchn_rx)


def max_granule_order(value: str | bytes | None) -> int:
    """The toolstack's `xenpv-max-grant-granule-order`: absent = the largest (4)."""
    top = granule.MAX_GRANULE_ORDER
    return toolstack_setting(value, XENPV_MAX_GRANULE_ORDER, top, 0, top)


def max_queues(value: str | bytes | None) -> int:
    """The toolstack's `xenpv-max-queues`: absent = `DEFAULT_MAX_QUEUES`."""
    return toolstack_setting(value, XENPV_MAX_QUEUES, DEFAULT_MAX_QUEUES, 1, NET_MAX_QUEUES)


def parse_granule_order(value: str | None, max_order: int | None) -> int:
    """The frontend's `grant-granule-order`, accepted against our `max_order`.

    `max_order` None: this backend does not speak the extension and ignores the key (order 0).
    """
    if max_order is None:
        return 0
    try:
        return granule.backend_accept(granule.parse_order(value, granule.FRONTEND_KEY), max_order)
    except granule.GranuleError as exc:
        raise NetbackConfigError(str(exc)) from None


def parse_frontend(
    flags: Mapping[str, str | None],
    queues: list[Mapping[str, str | None]],
    dirs: list[str],
    *,
    max_granule_order: int | None = None,
) -> FrontendConfig:
    """Validate what the frontend wrote (`flags`: FRONTEND_FLAGS, `queues`: QUEUE_KEYS per dir).

    `max_granule_order`: what this backend advertised (None: no extension, the key is ignored).
    """
    if parse_uint(flags.get("request-rx-copy"), "request-rx-copy", default=0) != 1:
        raise NetbackConfigError("frontend does not support rx-copy")
    order = parse_granule_order(flags.get(granule.FRONTEND_KEY), max_granule_order)
    can_sg = _flag(flags, "feature-sg")
    return FrontendConfig(
        queues=tuple(parse_queue(keys, where) for keys, where in zip(queues, dirs, strict=True)),
        can_sg=can_sg,
        rx_notify=_flag(flags, "feature-rx-notify"),
        offload=RxOffload(
            ipv4_csum=not _flag(flags, "feature-no-csum-offload"),
            ipv6_csum=_flag(flags, "feature-ipv6-csum-offload"),
            # TSO needs scatter-gather (the netdev core drops it without NETIF_F_SG).
            gso_tcpv4=can_sg and _flag(flags, "feature-gso-tcpv4"),
            gso_tcpv6=can_sg and _flag(flags, "feature-gso-tcpv6"),
        ),
        granule_order=order,
    )
