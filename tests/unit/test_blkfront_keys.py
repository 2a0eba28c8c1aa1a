"""blkfront's xenstore keys (frontends/blkfront/keys.py): what it writes, what it accepts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.blkfront.errors import BlkfrontProtocolError
from frontends.blkfront.keys import (
    CONNECT_KEYS,
    Geometry,
    Wishes,
    default_protocol,
    geometry,
    is_ring_key,
    negotiated,
    setup_keys,
)


def test_single_queue_order_0_keys_are_linux_s() -> None:
    keys = setup_keys(Geometry(0, 1), [[8]], [5], Wishes())
    assert keys == {
        "ring-ref": 8,
        "event-channel": 5,
        "protocol": "x86_64-abi",
        "feature-persistent": 1,
    }


def test_multi_queue_multi_page_keys() -> None:
    keys = setup_keys(Geometry(1, 2), [[8, 9], [10, 11]], [5, 6], Wishes(protocol="arm-abi"))
    assert keys == {
        "ring-page-order": 1,
        "multi-queue-num-queues": 2,
        "queue-0/ring-ref0": 8,
        "queue-0/ring-ref1": 9,
        "queue-0/event-channel": 5,
        "queue-1/ring-ref0": 10,
        "queue-1/ring-ref1": 11,
        "queue-1/event-channel": 6,
        "protocol": "arm-abi",
        "feature-persistent": 1,
    }
    assert all(
        is_ring_key(k.split("/")[0]) for k in keys if k not in ("protocol", "feature-persistent")
    )
    assert default_protocol(4096) == "x86_64-abi" and default_protocol(65536) == "arm-abi"


def test_geometry_takes_the_minimum() -> None:
    assert geometry(Wishes(), {}) == Geometry(0, 1)
    assert geometry(
        Wishes(), {"max-ring-page-order": "9", "multi-queue-max-queues": "16"}
    ) == Geometry(4, 4)
    assert geometry(
        Wishes(max_queues=2), {"max-ring-page-order": "2", "multi-queue-max-queues": "8"}
    ) == Geometry(2, 2)
    assert geometry(
        Wishes(), {"max-ring-page-order": "-1", "multi-queue-max-queues": "x"}
    ) == Geometry(0, 1)


def test_connect_features() -> None:
    neg = negotiated(
        Wishes(),
        Geometry(0, 1),
        {
            "sectors": "2048",
            "info": "4",
            "sector-size": "4096",
            "feature-barrier": "1",
            "feature-persistent": "1",
            "feature-max-indirect-segments": "4096",
        },
        grant_size=4096,
        handle=51712,
    )
    assert (neg.sectors, neg.sector_size, neg.read_only, neg.persistent) == (2048, 4096, True, True)
    assert neg.flush_op == 2 and neg.indirect_segments == 256 and not neg.discard
    neg = negotiated(
        Wishes(persistent=False),
        Geometry(0, 1),
        {
            "sectors": "8",
            "feature-persistent": "1",
            "feature-max-indirect-segments": "11",
            "feature-flush-cache": "1",
            "feature-barrier": "1",
        },
        grant_size=4096,
        handle=0,
    )
    assert not neg.persistent and neg.indirect_segments == 0 and neg.flush_op == 3


values = st.one_of(st.none(), st.text(max_size=8), st.integers(-5, 1 << 40).map(str))


@settings(max_examples=300)
@given(keys=st.fixed_dictionaries({k: values for k in CONNECT_KEYS}))
def test_any_backend_keys_give_usable_parameters_or_a_protocol_error(
    keys: dict[str, str | None],
) -> None:
    try:
        neg = negotiated(Wishes(), Geometry(0, 1), keys, grant_size=4096, handle=51712)
    except BlkfrontProtocolError:
        return
    assert neg.sectors >= 0
    assert neg.sector_size in (512, 1024, 2048, 4096)
    assert neg.indirect_segments == 0 or 11 < neg.indirect_segments <= 256
    assert neg.flush_op in (None, 2, 3)
