"""The vif handshake's data, sans-IO: what netback advertises and what it reads back.

Advertise (Linux `netback_probe`, same keys and order): `feature-sg`, `feature-gso-tcpv4`,
`feature-gso-tcpv6`, `feature-ipv6-csum-offload`, `feature-rx-copy`, `feature-rx-flip`=0,
`feature-split-event-channels`, `multi-queue-max-queues`, `feature-ctrl-ring`. xenpv does not
implement the control ring (hash / indirection table configuration), so it advertises
`feature-ctrl-ring` = 0, nor multicast control (`feature-multicast-control` is not written;
MCAST_ADD/DEL extras are still accepted and recorded, as netback does). With the grant-granule
extension (docs/granule-extension.md) it also advertises `max-grant-granule-order` (the toolstack
may lower it per device with `xenpv-max-grant-granule-order` in the backend directory).

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
`queue-<n>/`. Flags are read with `xenbus_read_unsigned(..., 0)` semantics: missing or junk = 0,
except `feature-sg`-style booleans which are "non-zero = on".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from backends.netback.offload import RxOffload
from xenpv import granule
from xenpv.errors import XenpvError

DEFAULT_MAX_QUEUES: Final = 4  # Linux: the number of online CPUs
MAX_QUEUES_KEY: Final = "xenpv-max-queues"  # optional toolstack override in the backend dir
# Optional toolstack override in the backend dir: the largest granule order to advertise
# (absent: granule.MAX_GRANULE_ORDER; the same key the blkback and `xenpv interop` use).
MAX_GRANULE_CONFIG_KEY: Final = "xenpv-max-grant-granule-order"

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
        "feature-ctrl-ring": 0,
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


def unsigned(value: str | None, default: int = 0) -> int:
    """xenbus_read_unsigned: a missing or unparseable value reads as `default`."""
    if value is None:
        return default
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() else default


def _required(keys: Mapping[str, str | None], name: str, where: str) -> int:
    value = keys.get(name)
    text = (value or "").strip()
    if not (text.isascii() and text.isdigit()):
        raise NetbackConfigError(
            f"reading {where}/{name}: {'missing' if value is None else repr(value)}"
        )
    number = int(text)
    if number > 0xFFFFFFFF:
        raise NetbackConfigError(f"{where}/{name} = {number} is out of range")
    return number


def queue_dirs(frontend: str, num_queues: int) -> list[str]:
    """Where each queue's keys live."""
    if num_queues == 1:
        return [frontend]
    return [f"{frontend}/queue-{n}" for n in range(num_queues)]


def parse_num_queues(value: str | None, max_queues: int) -> int:
    requested = unsigned(value, 1)
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


def max_granule_order(value: str | None) -> int:
    """The toolstack's `xenpv-max-grant-granule-order`: absent or junk = the largest (4),
    clamped to 0..4."""
    return min(unsigned(value, granule.MAX_GRANULE_ORDER), granule.MAX_GRANULE_ORDER)


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
    if unsigned(flags.get("request-rx-copy")) != 1:
        raise NetbackConfigError("frontend does not support rx-copy")
    order = parse_granule_order(flags.get(granule.FRONTEND_KEY), max_granule_order)
    can_sg = unsigned(flags.get("feature-sg")) != 0
    return FrontendConfig(
        queues=tuple(parse_queue(keys, where) for keys, where in zip(queues, dirs, strict=True)),
        can_sg=can_sg,
        rx_notify=unsigned(flags.get("feature-rx-notify")) != 0,
        offload=RxOffload(
            ipv4_csum=unsigned(flags.get("feature-no-csum-offload")) == 0,
            ipv6_csum=unsigned(flags.get("feature-ipv6-csum-offload")) != 0,
            # TSO needs scatter-gather (the netdev core drops it without NETIF_F_SG).
            gso_tcpv4=can_sg and unsigned(flags.get("feature-gso-tcpv4")) != 0,
            gso_tcpv6=can_sg and unsigned(flags.get("feature-gso-tcpv6")) != 0,
        ),
        granule_order=order,
    )
