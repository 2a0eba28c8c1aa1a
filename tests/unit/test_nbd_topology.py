"""The `nbd` field of a topology's `[[vbd]]`, its xenstore key, and `xenpv nbd`'s topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.commands.nbd import build_topology
from xenpv.errors import UsageError
from xenpv.toolstack.provision import nbd_address
from xenpv.toolstack.topology import TopologyError, loads

BASE = """
[[domain]]
name = "backend"
role = "backend"

[[domain]]
name = "guest"
page_size = "64K"

[[vbd]]
frontend = "guest"
backend = "backend"
"""


@pytest.mark.parametrize("address", ["unix:/tmp/g.sock", "unix:g.sock", "tcp:127.0.0.1:10809"])
def test_nbd_field_is_parsed(address: str) -> None:
    topo = loads(BASE + f'nbd = "{address}"\n')
    assert topo.vbds[0].nbd == address


def test_nbd_field_is_optional() -> None:
    assert loads(BASE).vbds[0].nbd is None


@pytest.mark.parametrize("address", ["", "tcp:nohost", "udp:1.2.3.4:5", "/tmp/x.sock"])
def test_bad_nbd_field_names_the_field(address: str) -> None:
    with pytest.raises(TopologyError, match=r"vbd\[0\]\.nbd"):
        loads(BASE + f'nbd = "{address}"\n')


def test_relative_unix_paths_are_under_the_state_dir(tmp_path: Path) -> None:
    assert nbd_address("unix:g.sock", tmp_path) == f"unix:{tmp_path / 'g.sock'}"
    assert nbd_address("unix:/abs.sock", tmp_path) == "unix:/abs.sock"
    assert nbd_address("tcp:h:1", tmp_path) == "tcp:h:1"
    assert nbd_address(None, tmp_path) is None


@pytest.mark.parametrize("granule", [True, False])
def test_xenpv_nbd_topology(granule: bool) -> None:
    topo = build_topology(
        Path("/img"),
        1 << 20,
        page_size=16384,
        address="unix:/tmp/n.sock",
        granule=granule,
        read_only=True,
        transport="socket",
    )
    (vbd,) = topo.vbds
    assert [d.page_size for d in topo.guests] == [16384]
    assert (vbd.image, vbd.size, vbd.read_only, vbd.nbd) == (
        "/img",
        1 << 20,
        True,
        "unix:/tmp/n.sock",
    )
    assert vbd.features.max_granule_order == (4 if granule else 0)
    assert topo.transport == "socket"
    with pytest.raises(UsageError):
        build_topology(
            Path("/img"),
            512,
            page_size=4096,
            address="",
            granule=True,
            read_only=False,
            transport="tcp",
        )
