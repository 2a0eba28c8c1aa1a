"""JSON bodies of the fault runs' flat records (schedules, run configs, history ops,
violations): one field walk instead of a hand-written dict per record, each way."""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, fields
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")
Rid = TypeVar("Rid", bound="_Identified")


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


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


def record_from_json(cls: type[R], raw: Mapping[str, Any], **given: Any) -> R:
    """The record of type `cls` that `record_json` wrote as `raw`: each field read back as
    its annotated type (bool, int, float, str, `X | None`, `tuple[X, ...]`, `dict[K, V]`,
    `Any`, or a type with a `from_json`). A field absent from `raw` (or None there) takes its
    default, or None if its type allows it; `given` fields are taken as they are."""
    values = dict(given)
    for spec in fields(cls):
        if spec.name in given:
            continue
        kind = _hints(cls)[spec.name]
        value = raw.get(spec.name)
        if value is None:
            if _has_default(spec):
                continue
            if type(None) in typing.get_args(kind):
                values[spec.name] = None
                continue
            value = raw[spec.name]  # KeyError when it is absent
        values[spec.name] = _read(kind, value)
    return cls(**values)


class JsonRecord:
    """A dataclass record whose JSON is its `record_json` body, read back with
    `record_from_json`."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return record_json(cast("DataclassInstance", self))

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Self:
        return cast(Self, record_from_json(cast("type[DataclassInstance]", cls), raw))


def by_id(records: Iterable[Rid], record_id: str) -> Rid:
    """The record whose `id` is `record_id` (KeyError if there is none)."""
    for record in records:
        if record.id == record_id:
            return record
    raise KeyError(record_id)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _has_default(spec: Field[Any]) -> bool:
    return spec.default is not MISSING or spec.default_factory is not MISSING


def _read(kind: Any, value: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin is types.UnionType or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _read(inner, value)
    if origin is tuple:
        return tuple(_read(args[0], item) for item in value)
    if origin is dict:
        return {_read(args[0], k): _read(args[1], v) for k, v in dict(value).items()}
    if kind in (bool, int, float, str):
        return kind(value)
    return kind.from_json(value)
