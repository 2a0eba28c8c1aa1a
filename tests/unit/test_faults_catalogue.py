"""The fault catalogue: well-formed, and docs/faults.md carries it exactly."""

from __future__ import annotations

from pathlib import Path

from xenpv.faults.catalogue import CATALOGUE, KINDS, Family, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "faults.md"


def test_docs_table_matches_the_catalogue() -> None:
    text = DOCS.read_text()
    assert markdown_table() in text, (
        "docs/faults.md's catalogue table is out of date: regenerate it with "
        "xenpv.faults.catalogue.markdown_table()"
    )


def test_every_family_has_kinds_and_every_kind_is_well_formed() -> None:
    assert {k.family for k in KINDS} == set(Family)
    assert len(CATALOGUE) == len(KINDS)  # ids are unique
    for k in KINDS:
        assert k.targets and k.description
        for p in k.params:
            assert isinstance(p.default, p.type), (k.id, p.name)
            if p.choices:
                assert p.default in p.choices
            if isinstance(p.default, int | float) and not isinstance(p.default, bool):
                assert p.lo is None or p.lo <= p.default
                assert p.hi is None or p.default <= p.hi


def test_named_kinds_from_the_design_exist() -> None:
    for kind in (
        "event.storm",
        "grant.map-fail",
        "grant.batch-element-fail",
        "ring.double-fetch",
        "xenstore.watch-flood",
        "xenstore.xenstored-kill",
        "process.stop",
        "link.partition",
        "link.bandwidth",
        "storage.eio",
        "storage.power-cut",
        "device.detach-reattach",
    ):
        assert kind in CATALOGUE
    assert CATALOGUE["storage.power-cut"].loses_cache
    assert CATALOGUE["link.loss"].may_lose and CATALOGUE["link.duplicate"].may_duplicate
    assert CATALOGUE["link.loss"].injector == "xenpv.faults.link"
    assert CATALOGUE["event.drop"].injector == "xenpv.faults.agent"
    assert CATALOGUE["ring.double-fetch"].injector == "xenpv.faults.hostile"
    assert CATALOGUE["ring.double-fetch"].why_not is None
    assert CATALOGUE["grant.revoke-while-mapped"].injector == "xenpv.faults.agent"
    assert all(info.why_not is None for info in CATALOGUE.values())  # every kind injectable
    assert CATALOGUE["storage.eio"].why_not is None
