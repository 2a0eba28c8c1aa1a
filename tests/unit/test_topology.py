from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.toolstack.topology import TopologyError, default_topology, load, loads, parse_size

BASE = """
[[domain]]
name = "be"
role = "backend"
[[domain]]
name = "g"
page_size = "64K"
"""


def test_default_topology_has_three_page_sizes() -> None:
    topo = default_topology()
    assert sorted(g.page_size for g in topo.guests) == [4096, 16384, 65536]
    assert len(topo.backends) == 1
    assert {v.frontend for v in topo.vbds} == {g.name for g in topo.guests}
    assert {v.frontend for v in topo.vifs} == {g.name for g in topo.guests}
    assert topo.vbds[0].features.indirect_segments == 256


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        BASE
        + """
transport_is_not_here = 1
"""
    )
    with pytest.raises(TopologyError, match=r"domain\[1\]\.transport_is_not_here: unknown key"):
        load(path)
    topo = loads(
        'transport = "tcp"\n[xenstore]\ntcp = "127.0.0.1:0"\n'
        + BASE
        + """
[[vbd]]
frontend = "g"
backend = "be"
size = "1M"
sector_size = 4096
[vbd.features]
indirect_segments = 0
ring_page_order = 0
[[vif]]
frontend = "g"
backend = "be"
tap = "xv0"
"""
    )
    assert topo.transport == "tcp" and topo.xenstore_tcp == "127.0.0.1:0"
    assert topo.domain("g").page_size == 65536
    assert topo.vbds[0].features.indirect_segments == 0
    assert topo.vbds[0].features.persistent is True
    assert topo.vbds[0].image is None and topo.vbds[0].size == 1 << 20
    assert topo.vifs[0].mac == "00:16:3e:00:00:01" and topo.vifs[0].tap == "xv0"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[[vbd]]\nfrontend = "nope"\nbackend = "be"\n',
            r"vbd\[0\]\.frontend: no domain named 'nope'",
        ),
        ('[[vbd]]\nfrontend = "be"\nbackend = "be"\n', r"vbd\[0\]\.frontend: domain 'be' has role"),
        ('[[vbd]]\nfrontend = "g"\nbackend = "be"\nsector_size = 1024\n', r"sector_size: must be"),
        ('[[vbd]]\nfrontend = "g"\nbackend = "be"\nsize = "1000"\n', r"vbd\[0\]\.size: must be a"),
        (
            '[[vbd]]\nfrontend = "g"\nbackend = "be"\n[vbd.features]\nqueues = 9\n',
            r"vbd\[0\]\.features\.queues: must be between 1 and 4, got 9",
        ),
        ('[[vif]]\nfrontend = "g"\nbackend = "be"\nmac = "01:00:00:00:00:01"\n', "unicast"),
        ('[[vif]]\nfrontend = "g"\nbackend = "be"\nmac = "zz"\n', r"vif\[0\]\.mac: expected a MAC"),
        ('[[domain]]\nname = "g"\n', r"domain\[2\]\.name: duplicate domain name 'g'"),
        (
            '[[domain]]\nname = "x"\npage_size = "8K"\n',
            r"domain\[2\]\.page_size: must be 4K, 16K or",
        ),
        ('[[domain]]\nname = "x y"\n', r"domain\[2\]\.name: use letters"),
        ('[[domain]]\nrole = "guest"\n', r"domain\[2\]\.name: missing"),
    ],
)
def test_errors_name_the_field(extra: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        loads(BASE + extra)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="not valid TOML"):
        loads("[[domain]\n")
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "missing.toml")
    with pytest.raises(TopologyError, match="at least one"):
        loads('transport = "auto"\n')
    with pytest.raises(TopologyError, match="transport: must be one of"):
        loads('transport = "carrier-pigeon"\n' + BASE)


@pytest.mark.parametrize(
    ("value", "size"), [(4096, 4096), ("4K", 4096), ("64M", 64 << 20), ("1GiB", 1 << 30)]
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [0, -1, True, "4X", "", "K"])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(TopologyError, match=r"^x: "):
        parse_size(value, "x")
