"""The fault agents' injectors, apart from any domain: event notifications (drop, duplicate,
delay), grant operations (map-fail, k-th batch element) filtered by peer and by the device
whose task runs, and xenstored's request faults (commit EAGAIN, connection reset)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import structlog
import trio

from tests.unit.faults_helpers import fault
from xenpv.faults.agent import EventInjector, GrantInjector, current_device
from xenpv.faults.control import Control, RunConfig
from xenpv.faults.xsagent import XsFaultSet, apply
from xenpv.hv.gntst import GNTST
from xenpv.xenstore.server import ServerConfig
from xenpv.xenstore.wire import Message, XsType

BACKEND, GUEST = 1, 2


def _channel(remote: int) -> Any:
    return SimpleNamespace(remote_domid=remote)


def test_event_drop_and_duplicate_on_the_peers_channels_only() -> None:
    sent: list[str] = []
    events = EventInjector(1, spawn=lambda *a: None)
    events.start(fault("event.drop", "domain:guest4k"), BACKEND, None)
    assert events.on_event(_channel(BACKEND), lambda: sent.append("x")) is True
    assert sent == []  # dropped
    assert events.on_event(_channel(3), lambda: sent.append("other")) is False  # not its peer
    events.stop(fault("event.drop", "domain:guest4k"))
    events.start(fault("event.duplicate", "domain:guest4k", "f1.0"), None, None)
    assert events.on_event(_channel(3), lambda: sent.append("dup")) is True
    assert sent == ["dup", "dup"]


async def test_event_delay_sends_later() -> None:
    sent: list[float] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            events = EventInjector(1, spawn=nursery.start_soon)
            events.start(fault("event.delay", "domain:g", delay=0.05), None, None)
            start = trio.current_time()
            assert events.on_event(_channel(BACKEND), lambda: sent.append(trio.current_time()))
            assert sent == []
    assert sent and sent[0] - start >= 0.05


def test_device_targeted_faults_hit_only_that_devices_tasks() -> None:
    grants = GrantInjector(1)
    eagain_fault = fault("grant.map-fail", "device:guest4k:vbd:xvda", status="GNTST_eagain")
    grants.start(eagain_fault, GUEST, "vbd/2/51712")
    assert grants.fail("copy", GUEST, 2) is None  # no device task running
    with structlog.contextvars.bound_contextvars(device="vif/2/0"):
        assert current_device() == "vif/2/0"
        assert grants.fail("copy", GUEST, 2) is None  # another device of the same guest
    with structlog.contextvars.bound_contextvars(device="vbd/2/51712"):
        eagain = int(GNTST.GNTST_eagain)
        assert grants.fail("map", GUEST, 3) == [eagain] * 3
        assert grants.fail("map", 5, 3) is None  # another peer's grants


def test_batch_element_fail_fails_element_k_only_count_times() -> None:
    grants = GrantInjector(1)
    f = dataclasses.replace(
        fault("grant.batch-element-fail", "domain:backend", k=2, status="GNTST_bad_gntref"),
        count=1,
    )
    grants.start(f, None, None)
    assert grants.fail("copy", GUEST, 2) is None  # no element 2 in a batch of 2
    assert grants.fail("copy", GUEST, 4) == [0, 0, int(GNTST.GNTST_bad_gntref), 0]
    assert grants.fail("copy", GUEST, 4) is None  # count spent
    grants.stop(f)
    assert not grants.active


def _commit(tx: int = 7) -> Message:
    return Message(XsType.XS_TRANSACTION_END, 1, tx, b"T\0")


def test_xenstored_faults_follow_the_control_node(tmp_path: Any) -> None:
    config = ServerConfig(str(tmp_path / "sock"), tmp_path)
    run = RunConfig(0.0, str(tmp_path), 1, {"backend": 1, "guest4k": 2}, {})
    eagain = fault("xenstore.commit-eagain", "domain:guest4k", one_in=1)
    reset = fault("xenstore.conn-reset", "domain:guest4k", "f1.0")
    current = apply(config, None, Control(run, (eagain, reset)))
    assert isinstance(config.faults, XsFaultSet) and current is config.faults
    assert config.faults.on_request(0, _commit()) is None  # dom0 is never faulted
    assert config.faults.on_request(1, _commit()) is None  # not the target domain
    first = config.faults.on_request(2, Message(XsType.XS_READ, 1, 0, b"x\0"))
    assert first is not None and first.fail  # the reset, once
    verdict = config.faults.on_request(2, _commit())
    assert verdict is not None and verdict.error == "EAGAIN"
    abort = Message(XsType.XS_TRANSACTION_END, 1, 7, b"F\0")
    assert config.faults.on_request(2, abort) is None  # an abort is left alone
    assert apply(config, current, Control(run, ())) is None
    assert config.faults is None  # idle again: the seam costs nothing
