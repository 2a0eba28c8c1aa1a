"""The fault runs' records as JSON, both ways (`xenpv.faults.records`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from xenpv.faults.records import JsonRecord, by_id, record_from_json, record_json


@dataclass(frozen=True, slots=True)
class Inner(JsonRecord):
    id: str
    n: int


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float
    limit: int | None
    inner: tuple[Inner, ...]
    counts: dict[str, int]
    extra: Any
    tags: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)


def test_a_record_reads_back_what_record_json_wrote() -> None:
    inner = (Inner("a", 1), Inner("b", 2))
    outer = Outer("x", 1.5, None, inner, {"k": 3}, {"any": [1]}, ("t",), {"n": "v"})
    body = record_json(outer)
    body["inner"] = [i.to_json() for i in outer.inner]
    assert record_from_json(Outer, body) == outer
    assert Inner.from_json(Inner("a", 1).to_json()) == Inner("a", 1)


def test_reading_converts_and_fills_absent_fields() -> None:
    raw = {"name": 7, "rate": 2, "inner": [{"id": "a", "n": "4"}], "counts": {1: "2"}}
    raw["extra"] = None
    got = record_from_json(Outer, raw, limit=9)
    assert got == Outer("7", 2.0, 9, (Inner("a", 4),), {"1": 2}, None)
    assert isinstance(got.rate, float)
    assert record_from_json(Outer, raw | {"tags": None}).limit is None  # absent, optional
    with pytest.raises(KeyError):
        record_from_json(Inner, {"id": "a"})  # absent, no default


def test_by_id() -> None:
    records = [Inner("a", 1), Inner("b", 2)]
    assert by_id(records, "b") == Inner("b", 2)
    with pytest.raises(KeyError):
        by_id(records, "c")
