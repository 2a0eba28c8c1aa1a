"""`unix:PATH` / `tcp:HOST:PORT` addresses, and the three parsers built on them (sans-IO)."""

from __future__ import annotations

import pytest

from xenpv.address import split_address
from xenpv.errors import UsageError, XenpvError
from xenpv.hv import HvError
from xenpv.hv.peerlinks import parse_endpoint
from xenpv.nbd.server import parse_address as nbd_address
from xenpv.xenstore.client import Address
from xenpv.xenstore.client import parse_address as xenstore_address


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("unix:/run/x.sock", ("unix", "/run/x.sock", 0)),
        ("unix:rel:with:colons", ("unix", "rel:with:colons", 0)),
        ("tcp:127.0.0.1:7100", ("tcp", "127.0.0.1", 7100)),
        ("tcp:[::1]:0", ("tcp", "::1", 0)),
        ("tcp:host:99999", ("tcp", "host", 99999)),
        ("unix:", None),
        ("unix", None),
        ("tcp:host", None),
        ("tcp::7100", None),
        ("tcp:host:-1", None),
        ("udp:host:7100", None),
        ("", None),
    ],
)
def test_split_address(text: str, parts: tuple[str, str, int] | None) -> None:
    assert split_address(text) == parts


def test_each_parser_keeps_its_port_range_and_error() -> None:
    assert parse_endpoint("tcp:h:0") == ("tcp", "h", 0)
    assert nbd_address("tcp:h:0") == ("tcp", "h", 0)
    with pytest.raises(UsageError, match="NBD address"):
        nbd_address("tcp:h:65536")
    with pytest.raises(HvError, match="bad link endpoint"):
        parse_endpoint("tcp:h")
    assert xenstore_address("tcp:[::1]:7000") == Address("tcp", host="::1", port=7000)
    assert xenstore_address("unix:/s") == Address("unix", path="/s")
    for bad in ("tcp:h:0", "tcp:h:65536", "unix:"):
        with pytest.raises(XenpvError, match="bad xenstore address"):
            xenstore_address(bad)
