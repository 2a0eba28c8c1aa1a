"""The run history: one JSON object per line, totally ordered, tamper-evident.

Each line is an operation as Jepsen records them:

    {"index": 7, "time": 1.25, "process": "guest4k/blk0", "type": "invoke", "f": "write",
     "key": "vbd:guest4k:51712:block=3", "value": "guest4k.0/3/17", "digest": "…"}

- `type`: `invoke` (an operation starts), `ok` (it completed), `fail` (it certainly did not
  happen), `info` (outcome unknown; also used for events that are not operations);
- `f`: what was done (see `OPS`); the first line is always `info`/`schedule` whose value is the
  schedule (`xenpv.faults.schedule`), so a history can be checked offline;
- `digest` chains the lines: sha256(previous digest + canonical JSON of the line without its
  digest), starting from 64 zeroes, so any alteration, insertion or removal is detected and the
  first altered line is named;
- the writer's `close()` appends an `end` line: a chain cannot show that lines were cut off
  at the end, a missing `end` line can (or that the run stopped early);
- `history_hash` covers the lines without `time` and `digest`: two runs that did the same
  things in the same order have the same hash whatever the wall clock said.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from xenpv import clock as clock_mod
from xenpv.errors import XenpvError
from xenpv.faults.records import record_json
from xenpv.faults.schedule import Schedule, canonical_json

TYPES = ("invoke", "ok", "fail", "info")
OPS = (
    "schedule",  # info: the schedule, always line 0
    "write",
    "read",
    "flush",
    "send",
    "recv",
    "xs-write",
    "xs-read",
    "xs-watch",  # info: a watch event arrived for `key`
    "fault-start",  # info: value {"id", "kind", "target"}
    "fault-stop",
    "state",  # info: key `state:GUEST:vbd:xvda:frontend` (xenbus state) or `domain:NAME` (up/down)
    "probe",  # a probe I/O on a device, key = the device's key prefix
    "end",  # info: the last line, written when the writer closes; value {"lines": n}
)
GENESIS = "0" * 64
FIELDS = ("index", "time", "process", "type", "f", "key", "value")


class HistoryError(XenpvError):
    """A history file is malformed or was altered; the message names the line."""


@dataclass(frozen=True, slots=True)
class Op:
    index: int
    time: float
    process: str
    type: str
    f: str
    key: str
    value: Any = None
    digest: str = ""

    def body(self) -> dict[str, Any]:
        return record_json(self, omit=("digest",))  # the digest chains over the body


def chain(previous: str, body: dict[str, Any]) -> str:
    return hashlib.sha256((previous + canonical_json(body)).encode()).hexdigest()


@dataclass(slots=True)
class History:
    ops: list[Op]
    schedule: Schedule
    finished: bool = True  # it ends with its `end` line

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def end_time(self) -> float:
        return self.ops[-1].time if self.ops else 0.0


def history_hash(ops: Sequence[Op]) -> str:
    """SHA-256 over the lines without `time` and `digest` (a determinism check)."""
    h = hashlib.sha256()
    for op in ops:
        body = op.body()
        del body["time"]
        h.update(canonical_json(body).encode() + b"\n")
    return h.hexdigest()


@dataclass(slots=True)
class HistoryChain:
    """The sans-IO part of the writer: indexes and digests, one line at a time."""

    digest: str = GENESIS
    next_index: int = 0

    def line(self, time: float, process: str, type: str, f: str, key: str, value: Any) -> Op:
        if type not in TYPES:
            raise ValueError(f"op type {type!r} is not one of {TYPES}")
        if f not in OPS:
            raise ValueError(f"op f {f!r} is not one of {OPS}")
        op = Op(self.next_index, round(time, 6), process, type, f, key, value)
        self.digest = chain(self.digest, op.body())
        self.next_index += 1
        return Op(op.index, op.time, process, type, f, key, value, self.digest)


def encode(op: Op) -> str:
    return canonical_json({**op.body(), "digest": op.digest}) + "\n"


class Recorder(Protocol):
    """What workloads and injections record through: a `HistoryWriter`, or a fault run's
    per-process `xenpv.faults.control.ProcessLog`."""

    def append(
        self,
        process: str,
        type: str,
        f: str,
        key: str,
        value: Any = None,
        *,
        time: float | None = None,
    ) -> Any: ...


@dataclass
class HistoryWriter:
    """Appends lines to a stream; safe to call from several threads and trio tasks (each
    append takes a lock, assigns the index and writes the whole line before releasing it)."""

    stream: IO[str]
    schedule: Schedule
    clock: Callable[[], float] = clock_mod.monotonic
    _chain: HistoryChain = field(default_factory=HistoryChain)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _start: float = 0.0
    _closed: bool = False

    def __post_init__(self) -> None:
        self._start = self.clock()
        self.append("runner", "info", "schedule", "schedule", self.schedule.to_json())

    def now(self) -> float:
        return self.clock() - self._start

    def append(
        self,
        process: str,
        type: str,
        f: str,
        key: str,
        value: Any = None,
        *,
        time: float | None = None,
    ) -> Op:
        with self._lock:
            if self._closed:
                raise ValueError("the history is closed")
            op = self._chain.line(
                self.now() if time is None else time, process, type, f, key, value
            )
            self.stream.write(encode(op))
            self.stream.flush()
        return op

    @property
    def digest(self) -> str:
        return self._chain.digest

    def close(self) -> None:
        """Append the `end` line (once); later appends are refused."""
        with self._lock:
            if self._closed:
                return
            n = self._chain.next_index
            op = self._chain.line(self.now(), "runner", "info", "end", "end", {"lines": n + 1})
            self.stream.write(encode(op))
            self.stream.flush()
            self._closed = True

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_line(raw: object, where: str, expected_index: int) -> Op:
    if not isinstance(raw, dict):
        raise HistoryError(f"{where}: expected a JSON object")
    missing = [k for k in (*FIELDS, "digest") if k not in raw]
    if missing:
        raise HistoryError(f"{where}: missing field {missing[0]!r}")
    extra = sorted(set(raw) - {*FIELDS, "digest"})
    if extra:
        raise HistoryError(f"{where}: unknown field {extra[0]!r}")
    index, t, process, type_, f, key, digest = (
        raw["index"],
        raw["time"],
        raw["process"],
        raw["type"],
        raw["f"],
        raw["key"],
        raw["digest"],
    )
    if isinstance(index, bool) or not isinstance(index, int) or index != expected_index:
        raise HistoryError(f"{where}: index {index!r}, expected {expected_index}")
    if isinstance(t, bool) or not isinstance(t, int | float) or t < 0:
        raise HistoryError(f"{where}: time must be a non-negative number, got {t!r}")
    for name, value in (("process", process), ("key", key), ("digest", digest)):
        if not isinstance(value, str):
            raise HistoryError(f"{where}: {name} must be a string, got {value!r}")
    if type_ not in TYPES:
        raise HistoryError(f"{where}: type {type_!r} is not one of {', '.join(TYPES)}")
    if f not in OPS:
        raise HistoryError(f"{where}: f {f!r} is not one of {', '.join(OPS)}")
    return Op(index, float(t), process, type_, f, key, raw["value"], digest)


def parse_lines(lines: Sequence[str], source: str = "history") -> History:
    """Validate every line and the digest chain; HistoryError names the first bad line."""
    ops: list[Op] = []
    digest = GENESIS
    for n, text in enumerate(lines, start=1):
        where = f"{source}:{n}"
        if not text.strip():
            raise HistoryError(f"{where}: empty line")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HistoryError(f"{where}: not JSON ({exc.msg})") from None
        op = _check_line(raw, where, len(ops))
        expected = chain(digest, op.body())
        if op.digest != expected:
            raise HistoryError(
                f"{where}: digest mismatch: this line (index {op.index}) or the one before it "
                "was altered, inserted or removed"
            )
        digest = op.digest
        if ops and ops[-1].f == "end":
            raise HistoryError(f"{where}: a line after the end line")
        if ops and op.time + 1e-6 < ops[-1].time:
            raise HistoryError(f"{where}: time {op.time} goes back (before {ops[-1].time})")
        ops.append(op)
    if not ops:
        raise HistoryError(f"{source}: empty history")
    first = ops[0]
    if first.f != "schedule" or not isinstance(first.value, dict):
        raise HistoryError(f"{source}:1: the first line must be the schedule")
    try:
        schedule = Schedule.from_json(first.value)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise HistoryError(f"{source}:1: bad schedule: {exc!r}") from None
    last = ops[-1]
    finished = last.f == "end"
    if finished and last.value != {"lines": len(ops)}:
        raise HistoryError(f"{source}:{len(ops)}: the end line does not count {len(ops)} lines")
    return History(ops, schedule, finished)


def read(path: Path) -> History:
    try:
        text = path.read_text()
    except OSError as exc:
        raise HistoryError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise HistoryError(f"{path}: not UTF-8 text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return parse_lines(lines, str(path))
