"""The xenstore keys of the vif handshake, frontend side (pure: dicts in, dicts out).

What Linux netfront's `talk_to_netback` reads from the backend directory and writes into its
own. One queue: `tx-ring-ref`, `rx-ring-ref` and `event-channel` (or `event-channel-tx` /
`event-channel-rx` when the backend offers `feature-split-event-channels`) at the top of the
frontend directory; several queues: `multi-queue-num-queues` at the top and those keys under
`queue-N/`. Then the frontend's features: `request-rx-copy`, `feature-rx-notify`,
`feature-sg`, `feature-gso-tcpv4`, `feature-gso-tcpv6`, `feature-ipv6-csum-offload`.

Grant granules (docs/granule-extension.md): the backend's `max-grant-granule-order` is read
with the features (absent: the backend predates the extension; junk: read as 0, the baseline,
since a frontend can always fall back safely); when the backend advertises it the frontend
writes the order it chose as `grant-granule-order`, 0 when it declines, so both ends state what
was agreed. A backend without the extension gets no key at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from xenpv import granule
from xenpv.errors import XenpvError
from xenpv.xenbus.keys import NET_MAX_QUEUES, parse_flag, parse_uint

BACKEND_FEATURE_KEYS: Final = (
    "feature-rx-copy",
    "feature-sg",
    "feature-gso-tcpv4",
    "feature-gso-tcpv6",
    "feature-ipv6-csum-offload",
    "feature-split-event-channels",
    "multi-queue-max-queues",
    granule.BACKEND_MAX_KEY,
)


class HandshakeError(XenpvError):
    """The backend's keys make a connection impossible (e.g. no rx-copy support)."""


@dataclass(frozen=True, slots=True)
class BackendFeatures:
    """What the backend offers, as read from its directory (missing key = not offered)."""

    rx_copy: bool = False
    sg: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False
    ipv6_csum_offload: bool = False
    split_event_channels: bool = False
    max_queues: int = 1
    max_granule_order: int | None = None  # None: no max-grant-granule-order (no extension)


def parse_features(keys: Mapping[str, str | None]) -> BackendFeatures:
    """The backend's offer: flags non-zero = on, missing or junk = off (xenpv.xenbus.keys)."""

    def on(name: str) -> bool:
        return parse_flag(keys.get(name), name)

    return BackendFeatures(
        rx_copy=on("feature-rx-copy"),
        sg=on("feature-sg"),
        gso_tcpv4=on("feature-gso-tcpv4"),
        gso_tcpv6=on("feature-gso-tcpv6"),
        ipv6_csum_offload=on("feature-ipv6-csum-offload"),
        split_event_channels=on("feature-split-event-channels"),
        max_queues=max(
            1, parse_uint(keys.get("multi-queue-max-queues"), "multi-queue-max-queues", default=1)
        ),
        max_granule_order=_granule_max(keys.get(granule.BACKEND_MAX_KEY)),
    )


def _granule_max(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return granule.parse_order(raw, granule.BACKEND_MAX_KEY)
    except granule.GranuleError:
        return 0  # a backend key we cannot read: the 4 KiB baseline always works


def negotiate_granule(page_size: int, features: BackendFeatures, cap: int | None) -> int:
    """The order this frontend uses: min(page order, `cap`, the backend's maximum).

    `cap` None = as large as allowed, 0 = decline."""
    return granule.frontend_choice(page_size, features.max_granule_order or 0, cap)


def negotiate_queues(wanted: int, features: BackendFeatures) -> int:
    """`min(xennet_max_queues, multi-queue-max-queues)`, at least one."""
    return max(1, min(wanted, features.max_queues, NET_MAX_QUEUES))


@dataclass(frozen=True, slots=True)
class QueueKeys:
    tx_ring_ref: int
    rx_ring_ref: int
    evtchn_tx: int
    evtchn_rx: int  # equal to evtchn_tx without split event channels


def frontend_keys(
    queues: Sequence[QueueKeys], *, split_event_channels: bool, granule_order: int | None = None
) -> dict[str, str | int]:
    """Everything the frontend publishes with its switch to Connected.

    `granule_order` None: no `grant-granule-order` key (the backend has no extension)."""
    if not queues:
        raise HandshakeError("a vif needs at least one queue")
    keys: dict[str, str | int] = {}

    def queue(prefix: str, q: QueueKeys) -> None:
        keys[f"{prefix}tx-ring-ref"] = q.tx_ring_ref
        keys[f"{prefix}rx-ring-ref"] = q.rx_ring_ref
        if split_event_channels:
            keys[f"{prefix}event-channel-tx"] = q.evtchn_tx
            keys[f"{prefix}event-channel-rx"] = q.evtchn_rx
        else:
            keys[f"{prefix}event-channel"] = q.evtchn_tx

    if len(queues) == 1:
        queue("", queues[0])
    else:
        keys["multi-queue-num-queues"] = len(queues)
        for n, q in enumerate(queues):
            queue(f"queue-{n}/", q)
    keys.update(
        {
            "request-rx-copy": 1,
            "feature-rx-notify": 1,
            "feature-sg": 1,
            "feature-gso-tcpv4": 1,
            "feature-gso-tcpv6": 1,
            "feature-ipv6-csum-offload": 1,
        }
    )
    if granule_order is not None:
        keys[granule.FRONTEND_KEY] = granule_order
    return keys


def stale_keys(max_queues: int) -> list[str]:
    """Keys a previous connection may have left that the new one might not overwrite."""
    names = ["multi-queue-num-queues", "event-channel", "event-channel-tx", "event-channel-rx"]
    names.append(granule.FRONTEND_KEY)
    names += [f"queue-{n}" for n in range(max_queues)]
    return names


def parse_mac(raw: str | None) -> bytes:
    """The `mac` key ("00:16:3e:xx:xx:xx") as 6 bytes; HandshakeError if malformed."""
    if raw is None:
        raise HandshakeError("the frontend directory has no `mac` key")
    parts = raw.strip().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise HandshakeError(f"malformed mac {raw!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise HandshakeError(f"malformed mac {raw!r}") from None
