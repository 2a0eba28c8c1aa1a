"""`xenpv topology example` and the topologies in examples/: each parses and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.cli import main
from xenpv.commands.topology import EXAMPLE_TOML, summary
from xenpv.toolstack import topology

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_is_the_demo_topology_with_comments() -> None:
    assert topology.loads(EXAMPLE_TOML, "example") == topology.default_topology()
    assert EXAMPLE_TOML.count("#") > 20  # every setting is explained


def test_example_round_trip_through_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cluster.toml"
    assert main(["topology", "example", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    assert topology.load(out) == topology.default_topology()
    assert main(["topology", "example", "-o", str(out)]) == 1  # no silent overwrite
    assert "exists; --force overwrites it" in capsys.readouterr().err
    assert main(["topology", "example", "-o", str(out), "--force"]) == 0
    assert main(["topology", "example"]) == 0
    assert capsys.readouterr().out == EXAMPLE_TOML
    assert main(["topology", "check", str(out)]) == 0
    assert "ok, 4 domains (1 backend, 3 guests: 1x4K 1x16K 1x64K)" in capsys.readouterr().out


def test_check_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE_TOML.replace('backend = "backend"', 'backend = "zz"', 1))
    assert main(["topology", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vbd[0].backend: no domain named 'zz'" in err


@pytest.mark.parametrize("name", ["mixed-pages", "tap", "multi-queue", "large"])
def test_examples_validate(name: str) -> None:
    topo = topology.load(EXAMPLES / f"{name}.toml")
    assert summary(topo)
    if name == "mixed-pages":
        assert {d.page_size for d in topo.backends} == {4096, 65536}
        assert {d.page_size for d in topo.guests} == {4096, 16384, 65536}
        # every guest uses a backend of another page size at least once
        for guest in topo.guests:
            ends = [v.backend for v in (*topo.vbds, *topo.vifs) if v.frontend == guest.name]
            assert any(topo.domain(b).page_size != guest.page_size for b in ends)
    elif name == "tap":
        assert [v.tap for v in topo.vifs] == ["xpv-a", "xpv-b"]
    elif name == "multi-queue":
        queues = sorted(v.features.queues for v in topo.vbds)
        orders = sorted(v.features.ring_page_order for v in topo.vbds)
        assert queues == [1, 4] and orders == [0, 4]
    else:
        assert len(topo.guests) == 16 and len(topo.vbds) == len(topo.vifs) == 16


def test_every_example_is_tested() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.toml")) == sorted(
        ["mixed-pages", "tap", "multi-queue", "large"]
    )
