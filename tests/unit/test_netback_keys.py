"""netback handshake data: advertised keys and frontend key parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.keys import (
    NetbackConfigError,
    QueueConfig,
    advertise_keys,
    parse_frontend,
    parse_num_queues,
    queue_dirs,
)
from backends.netback.offload import RxOffload


def test_advertised_keys_in_netback_order() -> None:
    keys = advertise_keys(4)
    assert list(keys) == [
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-ipv6-csum-offload",
        "feature-rx-copy",
        "feature-rx-flip",
        "feature-split-event-channels",
        "multi-queue-max-queues",
        "feature-ctrl-ring",
    ]
    assert keys["feature-rx-flip"] == 0 and keys["feature-ctrl-ring"] == 1
    assert keys["multi-queue-max-queues"] == 4


FLAGS = {"request-rx-copy": "1", "feature-sg": "1", "feature-rx-notify": "1"}


def test_single_queue_shared_channel() -> None:
    config = parse_frontend(
        {**FLAGS, "feature-gso-tcpv4": "1"},
        [{"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}],
        ["fe"],
    )
    assert config.queues == (QueueConfig(8, 9, 3, 3),)
    assert not config.queues[0].split and config.can_sg and config.rx_notify
    assert config.offload == RxOffload(ipv4_csum=True, ipv6_csum=False, gso_tcpv4=True)


def test_split_channels_and_offload_flags() -> None:
    config = parse_frontend(
        {**FLAGS, "feature-no-csum-offload": "1", "feature-ipv6-csum-offload": "1"},
        [
            {
                "tx-ring-ref": "8",
                "rx-ring-ref": "9",
                "event-channel-tx": "3",
                "event-channel-rx": "4",
            }
        ],
        ["fe"],
    )
    assert config.queues[0].split and config.queues[0].evtchn_rx == 4
    assert config.offload == RxOffload(ipv4_csum=False, ipv6_csum=True)


def test_gso_requires_sg() -> None:
    config = parse_frontend(
        {"request-rx-copy": "1", "feature-gso-tcpv4": "1"},
        [{"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}],
        ["fe"],
    )
    assert not config.can_sg and not config.offload.gso_tcpv4


@pytest.mark.parametrize(
    ("flags", "queue", "match"),
    [
        ({}, {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}, "rx-copy"),
        (FLAGS, {"rx-ring-ref": "9", "event-channel": "3"}, "tx-ring-ref"),
        (FLAGS, {"tx-ring-ref": "x", "rx-ring-ref": "9", "event-channel": "3"}, "tx-ring-ref"),
        (FLAGS, {"tx-ring-ref": "8", "rx-ring-ref": "9"}, "event-channel"),
        (
            FLAGS,
            {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel-tx": "3"},
            "event-channel-rx",
        ),
        (
            FLAGS,
            {"tx-ring-ref": "99999999999", "rx-ring-ref": "9", "event-channel": "3"},
            "outside",
        ),
    ],
)
def test_refusals(flags: dict[str, str], queue: dict[str, str | None], match: str) -> None:
    with pytest.raises(NetbackConfigError, match=match):
        parse_frontend(dict(flags), [queue], ["fe"])


def test_queue_counts_and_dirs() -> None:
    assert parse_num_queues(None, 4) == 1
    assert parse_num_queues("4", 4) == 4
    with pytest.raises(NetbackConfigError, match="exceeding the maximum of 4"):
        parse_num_queues("5", 4)
    with pytest.raises(NetbackConfigError):
        parse_num_queues("0", 4)
    assert queue_dirs("fe", 1) == ["fe"]
    assert queue_dirs("fe", 2) == ["fe/queue-0", "fe/queue-1"]


@settings(max_examples=100)
@given(
    st.dictionaries(
        st.sampled_from(
            ["tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx"]
        ),
        st.one_of(st.none(), st.text(max_size=12)),
    )
)
def test_garbage_keys_parse_or_refuse(queue: dict[str, str | None]) -> None:
    try:
        config = parse_frontend(FLAGS, [queue], ["fe"])
    except NetbackConfigError:
        return
    q = config.queues[0]
    assert all(
        0 <= v <= 0xFFFFFFFF for v in (q.tx_ring_ref, q.rx_ring_ref, q.evtchn_tx, q.evtchn_rx)
    )
