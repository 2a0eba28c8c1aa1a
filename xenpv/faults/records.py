"""JSON bodies of the fault runs' flat records (schedules, run configs, history ops,
violations): one field walk instead of a hand-written dict per record."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


def record_json(record: DataclassInstance, *, omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record's fields by name, in declaration order, except those in `omit`; a tuple
    becomes a list (what JSON reads back), so that a body compares equal after a round trip."""
    body: dict[str, Any] = {}
    for spec in fields(record):
        if spec.name in omit:
            continue
        value = getattr(record, spec.name)
        body[spec.name] = list(value) if isinstance(value, tuple) else value
    return body
