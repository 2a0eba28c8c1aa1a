"""Hot-plug rules that need no xenstore: an offline backend never starts over, `online`
parsing, the `xenpv device` argument validators, the control ring's request handling (Linux
netback's statuses) and steering."""

from __future__ import annotations

import argparse
import struct

import pytest

from xenpv.abi.netif_ctrl import (
    CtrlRequest,
    CtrlStatus,
    CtrlType,
    HashAlgorithm,
    HashFlags,
    HashSettings,
)
from xenpv.commands.device import device_name, mac_address, xvd
from xenpv.xenbus.core import (
    Action,
    Closed,
    Closing,
    Connected,
    Initialising,
    backend_reaction,
    parse_online,
)


def test_an_offline_backend_does_not_reset() -> None:
    for me in (Closed, Closing, Connected):
        online = backend_reaction(me, Initialising)
        assert online is not None and online.action is Action.RESET
        assert backend_reaction(me, Initialising, online=False) is None
    # closing still happens offline: that is the unplug
    closing = backend_reaction(Closing, Closed, online=False)
    assert closing is not None and (closing.action, closing.next_state) == (Action.CLOSE, Closed)


@pytest.mark.parametrize(
    ("raw", "online"), [(None, True), (b"1", True), (b"0", False), (" 0\n", False), (b"x", True)]
)
def test_parse_online(raw: bytes | str | None, online: bool) -> None:
    assert parse_online(raw) is online


def test_device_argument_validators() -> None:
    assert device_name("xvdb") == ("vbd", 51728)
    assert device_name("vif3") == ("vif", 3)
    assert device_name("vbd/768") == ("vbd", 768)
    assert device_name("vif/0") == ("vif", 0)
    assert xvd("xvdp") == 15
    assert mac_address("00:16:3E:00:00:01") == "00:16:3e:00:00:01"
    for parse, bad in ((device_name, "eth0"), (xvd, "xvdz"), (mac_address, "01:00:00:00:00:00")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def _handle(hs: HashSettings, kind: CtrlType, data: tuple[int, int, int], page: bytes = b"") -> int:
    request = CtrlRequest(1, kind, data)
    needed = hs.grant_needed(request)
    granted = None if needed is None else page[: needed[1]]
    response = hs.handle(request, granted)
    assert (response.id, response.type) == (1, kind)
    return response.status


def test_ctrl_requests_answer_as_linux_netback() -> None:
    hs = HashSettings(num_queues=2)
    S = CtrlStatus
    assert _handle(hs, CtrlType.SET_HASH_FLAGS, (1, 0, 0)) == S.INVALID_PARAMETER  # no alg yet
    assert _handle(hs, CtrlType.SET_HASH_ALGORITHM, (9, 0, 0)) == S.INVALID_PARAMETER
    assert _handle(hs, CtrlType.SET_HASH_ALGORITHM, (1, 0, 0)) == S.SUCCESS
    assert hs.algorithm is HashAlgorithm.TOEPLITZ
    assert _handle(hs, CtrlType.SET_HASH_FLAGS, (1 << 4, 0, 0)) == S.INVALID_PARAMETER
    assert _handle(hs, CtrlType.SET_HASH_FLAGS, (3, 0, 0)) == S.SUCCESS
    assert hs.flags == HashFlags.IPV4 | HashFlags.IPV4_TCP
    assert _handle(hs, CtrlType.SET_HASH_KEY, (5, 41, 0)) == S.BUFFER_OVERFLOW
    assert _handle(hs, CtrlType.SET_HASH_KEY, (5, 4, 0), b"") == S.INVALID_PARAMETER  # no copy
    assert _handle(hs, CtrlType.SET_HASH_KEY, (5, 4, 0), b"abcd") == S.SUCCESS
    assert hs.key == b"abcd"
    assert _handle(hs, CtrlType.SET_HASH_MAPPING_SIZE, (129, 0, 0)) == S.INVALID_PARAMETER
    assert _handle(hs, CtrlType.SET_HASH_MAPPING_SIZE, (4, 0, 0)) == S.SUCCESS
    table = struct.pack("<2I", 1, 1)
    assert _handle(hs, CtrlType.SET_HASH_MAPPING, (6, 2, 3), table) == S.INVALID_PARAMETER
    assert _handle(hs, CtrlType.SET_HASH_MAPPING, (6, 2, 2), struct.pack("<2I", 1, 2)) == (
        S.INVALID_PARAMETER  # queue 2 of a 2-queue vif
    )
    assert _handle(hs, CtrlType.SET_HASH_MAPPING, (6, 2, 2), table) == S.SUCCESS
    assert hs.mapping == [0, 0, 1, 1]
    assert _handle(hs, CtrlType.ADD_GREF_MAPPING, (0, 0, 0)) == S.NOT_SUPPORTED
    assert _handle(hs, CtrlType.INVALID, (0, 0, 0)) == S.NOT_SUPPORTED
    assert _handle(hs, 200, (0, 0, 0)) == S.NOT_SUPPORTED  # type: ignore[arg-type]


def test_steering_follows_linux_select_queue() -> None:
    hs = HashSettings(num_queues=4)
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    assert hs.steer(arp) is None  # no algorithm: the caller's flow hash
    hs.algorithm = HashAlgorithm.TOEPLITZ
    hs.mapping = [2, 3]
    assert hs.steer(arp) == 2  # no hash type applies: hash 0 → mapping[0]
    hs.mapping = []
    assert hs.steer(arp) == 0  # ... and 0 modulo the queues without a table
