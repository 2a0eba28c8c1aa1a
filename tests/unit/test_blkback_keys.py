"""blkback's xenstore keys: toolstack configuration, advertised and published keys, and the
frontend's ring keys (validated, never trusted)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.blkback.keys import (
    BackendConfig,
    ConfigError,
    NegotiationError,
    advertise_keys,
    connect_keys,
    device_features,
    frontend_key_names,
    parse_config,
    parse_frontend,
)
from backends.storage import StorageInfo
from xenpv.abi.blkif import BLKIF_X86_32, BLKIF_X86_64


def info(**kw: object) -> StorageInfo:
    base: dict[str, object] = dict(
        size=1 << 20,
        sector_size=512,
        physical_sector_size=4096,
        read_only=False,
        flush=True,
        discard=True,
        discard_granularity=4096,
        discard_alignment=0,
        discard_secure=False,
    )
    base.update(kw)
    return StorageInfo(**base)  # type: ignore[arg-type]


def test_config_defaults_are_linux_limits() -> None:
    config = parse_config({"params": "/img", "type": "file", "mode": "w"})
    assert config == BackendConfig(kind="file", path="/img")
    assert (config.max_ring_page_order, config.max_queues, config.max_indirect_segments) == (
        4,
        4,
        256,
    )


def test_config_from_toolstack_keys() -> None:
    config = parse_config(
        {
            "params": "",
            "type": "memory",
            "mode": "r",
            "xenpv-size": "8192",
            "xenpv-sector-size": "4096",
            "xenpv-max-ring-page-order": "2",
            "xenpv-max-queues": "1",
            "xenpv-max-indirect-segments": "0",
            "xenpv-persistent": "0",
            "xenpv-flush": "0",
            "xenpv-barrier": "1",
            "xenpv-discard": "0",
        }
    )
    assert config.kind == "memory" and config.read_only and config.size == 8192
    assert config.sector_size == 4096 and config.max_ring_page_order == 2
    assert config.max_queues == 1 and config.max_indirect_segments == 0
    assert not config.persistent and not config.flush and config.barrier and not config.discard


@pytest.mark.parametrize(
    "keys",
    [
        {"type": "memory"},  # no size
        {"type": "memory", "xenpv-size": "1000"},  # not whole sectors
        {"type": "memory", "xenpv-size": "4096", "xenpv-sector-size": "1024"},
        {"type": "memory", "xenpv-size": "4096", "xenpv-max-ring-page-order": "5"},
        {"type": "memory", "xenpv-size": "4096", "xenpv-max-queues": "0"},
        {"type": "memory", "xenpv-size": "4096", "xenpv-max-indirect-segments": "5000"},
        {"type": "memory", "xenpv-size": "4096", "xenpv-flush": "yes"},
        {"type": "tape", "params": "/dev/st0"},
        {"type": "memory", "xenpv-size": "-4096"},
    ],
)
def test_config_errors(keys: dict[str, str | None]) -> None:
    with pytest.raises(ConfigError):
        parse_config(keys)


def test_advertise_keys_in_linux_order() -> None:
    keys = advertise_keys(BackendConfig())
    assert list(keys) == [
        "feature-max-indirect-segments",
        "multi-queue-max-queues",
        "max-ring-page-order",
        "feature-persistent",
        "max-grant-granule-order",  # docs/granule-extension.md
    ]
    # blkif.h: a backend without indirect support must not create the key at all
    assert "feature-max-indirect-segments" not in advertise_keys(
        BackendConfig(max_indirect_segments=0)
    )


def test_connect_keys() -> None:
    features = device_features(BackendConfig(), info())
    keys = connect_keys(info(), features)
    assert list(keys)[:1] == ["feature-flush-cache"]
    assert keys["sectors"] == 2048 and keys["info"] == 0
    assert keys["feature-discard"] == 1 and keys["discard-granularity"] == 4096
    assert keys["feature-barrier"] == 1 and keys["discard-secure"] == 0
    ro = info(read_only=True)
    ro_keys = connect_keys(ro, device_features(BackendConfig(), ro), cdrom=True)
    assert ro_keys["info"] == 4 | 1
    assert ro_keys["feature-flush-cache"] == ro_keys["feature-discard"] == 0
    assert "discard-granularity" not in ro_keys
    no_flush = device_features(BackendConfig(flush=False), info())
    assert not no_flush.flush and not no_flush.barrier  # a barrier needs flush


def test_parse_single_and_multi_queue() -> None:
    config = BackendConfig()
    single = parse_frontend({"ring-ref": "8", "event-channel": "3"}, config)
    assert single.protocol is BLKIF_X86_64 and single.ring_page_order == 0
    assert single.queues[0].ring_refs == (8,) and single.queues[0].event_channel == 3
    assert not single.persistent
    keys: dict[str, str | None] = {
        "protocol": "x86_32-abi",
        "feature-persistent": "1",
        "multi-queue-num-queues": "2",
        "ring-page-order": "1",
    }
    for q in range(2):
        keys[f"queue-{q}/event-channel"] = str(10 + q)
        keys[f"queue-{q}/ring-ref0"] = str(100 + 2 * q)
        keys[f"queue-{q}/ring-ref1"] = str(101 + 2 * q)
    multi = parse_frontend(keys, config)
    assert multi.protocol is BLKIF_X86_32 and multi.persistent
    assert [q.ring_refs for q in multi.queues] == [(100, 101), (102, 103)]
    assert set(frontend_key_names(2, 1)) >= set(keys)
    # persistent only when both ends want it
    assert not parse_frontend(keys, BackendConfig(persistent=False)).persistent


@pytest.mark.parametrize(
    "keys",
    [
        {"event-channel": "3"},  # no ring-ref
        {"ring-ref": "x", "event-channel": "3"},
        {"ring-ref": "1", "event-channel": "-3"},
        {"ring-ref": "1", "event-channel": "4294967296"},
        {"ring-ref": "1", "event-channel": "3", "protocol": "pdp11-abi"},
        {"ring-ref": "1", "event-channel": "3", "multi-queue-num-queues": "0"},
        {"ring-ref": "1", "event-channel": "3", "multi-queue-num-queues": "5"},
        {"ring-ref0": "1", "event-channel": "3", "ring-page-order": "5"},
        {"ring-ref0": "1", "event-channel": "3", "ring-page-order": "1"},  # ring-ref1 missing
        {"ring-ref": "1", "event-channel": "3", "multi-queue-num-queues": "2"},  # no queue-N/
    ],
)
def test_parse_rejects(keys: dict[str, str | None]) -> None:
    with pytest.raises(NegotiationError):
        parse_frontend(keys, BackendConfig())


_names = st.sampled_from(
    frontend_key_names(2, 2) + frontend_key_names(1, None) + frontend_key_names(1, 1)
)
_values = st.one_of(
    st.none(),
    st.integers(0, 2**33).map(str),
    st.sampled_from(["", "x86_64-abi", "arm-abi", "x86_32-abi", " 1", "0x10", "-1"]),
    st.text(max_size=8),
)


@settings(max_examples=300)
@given(st.dictionaries(_names, _values, max_size=20), st.integers(0, 4), st.integers(1, 4))
def test_parse_never_crashes(keys: dict[str, str | None], order: int, queues: int) -> None:
    """Any frontend keys: valid parameters within our offer, or NegotiationError."""
    config = BackendConfig(max_ring_page_order=order, max_queues=queues)
    try:
        params = parse_frontend(keys, config)
    except NegotiationError:
        return
    assert 1 <= len(params.queues) <= queues and params.ring_page_order <= order
    for queue in params.queues:
        assert len(queue.ring_refs) == 1 << params.ring_page_order
        assert all(0 <= r <= 0xFFFFFFFF for r in queue.ring_refs)
