"""The fault run's control plane: xenstore nodes the runner (dom0) writes and the per-process
history files every participant appends to.

Control nodes (dom0-owned; each readable by the one domain it is for, so they work across
containers and hosts with nothing but xenstore):

- `/tool/xenpv/faults/<domid>`: JSON `{"run": RunConfig, "faults": [ScheduledFault...]}`,
  the faults that domain's agent must have active right now, and what its workloads do;
- `/tool/xenpv/faults/xenstored`: the same for xenstored's `XsFaults` seam.

The runner rewrites a node when a fault window opens or closes; the agent diffs the list
against what it has active and starts or heals the difference. An absent node, or an empty
list, means no faults: the runner clears every node in a shielded `finally`.

History: every participant writes `<history_dir>/<process>.jsonl`, one JSON object per line
(`time`, `process`, `type`, `f`, `key`, `value`; no index, no digest), with `time` =
`time.monotonic()` minus the run's epoch (CLOCK_MONOTONIC is one clock for every process of a
host). `merge` orders the lines of every file by time and writes the one chained history.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from xenpv import clock
from xenpv.faults.history import OPS, TYPES, HistoryWriter
from xenpv.faults.records import JsonRecord
from xenpv.faults.schedule import Schedule, ScheduledFault

CONTROL_ROOT = "/tool/xenpv/faults"
XENSTORED = "xenstored"


def control_path(who: int | str) -> str:
    """The control node of a domain (by domid) or of `xenstored`."""
    return f"{CONTROL_ROOT}/{who}"


@dataclass(frozen=True, slots=True)
class RunConfig(JsonRecord):
    """What the runner tells every participant (the same for all; each picks its part)."""

    epoch: float  # time.monotonic() of the run's time 0 (the runner's clock, one host)
    history_dir: str
    seed: int
    domids: dict[str, int]
    schedule: dict[str, Any]  # the schedule's JSON (its workloads, topology and faults)
    macs: dict[str, str] = field(default_factory=dict)  # vif device id -> its MAC (xx:xx:..)


@dataclass(frozen=True, slots=True)
class Control:
    """The content of one control node."""

    run: RunConfig | None
    faults: tuple[ScheduledFault, ...] = ()
    phase: str = "run"  # run | probe | stop: workloads run, a liveness probe round, stop

    def encode(self) -> str:
        return json.dumps(
            {
                "run": None if self.run is None else self.run.to_json(),
                "faults": [f.to_json() for f in self.faults],
                "phase": self.phase,
            },
            sort_keys=True,
        )

    @classmethod
    def decode(cls, text: bytes | str | None) -> Control:
        """An absent or unreadable node is "no run, no faults" (the safe reading)."""
        if not text:
            return cls(None)
        try:
            raw = json.loads(text)
            run = None if raw.get("run") is None else RunConfig.from_json(raw["run"])
            faults = tuple(ScheduledFault.from_json(f) for f in raw.get("faults") or ())
            return cls(run, faults, str(raw.get("phase", "run")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(None)


@dataclass
class Hits:
    """Whether an active fault fires on one more operation (probability / count / one_in)."""

    fault: ScheduledFault
    rng: random.Random
    hits: int = 0
    seen: int = 0

    def fires(self) -> bool:
        self.seen += 1
        f = self.fault
        if f.count is not None and self.hits >= f.count:
            return False
        if f.probability is not None and self.rng.random() >= f.probability:
            return False
        one_in = param(f, "one_in", 1)
        if isinstance(one_in, int) and one_in > 1 and self.seen % one_in:
            return False
        self.hits += 1
        return True


def param(fault: ScheduledFault, name: str, default: Any) -> Any:
    try:
        return fault.param(name)
    except KeyError:
        return default


def history_file(history_dir: str | Path, process: str) -> Path:
    return Path(history_dir) / f"{process.replace('/', '_')}.jsonl"


class ProcessLog:
    """One participant's history lines (see the module doc); thread- and task-safe."""

    def __init__(self, path: Path, epoch: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.epoch = epoch
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._stream: IO[str] = path.open("a", encoding="utf-8")
        if torn:  # a killed incarnation's last line: end it, so that ours start clean
            self._stream.write("\n")
        self._lock = threading.Lock()
        self.lines = 0

    def now(self) -> float:
        return max(0.0, clock.monotonic() - self.epoch)

    def append(
        self,
        process: str,
        type: str,
        f: str,
        key: str,
        value: Any = None,
        *,
        time: float | None = None,
    ) -> None:
        if type not in TYPES or f not in OPS:
            raise ValueError(f"bad history line type={type!r} f={f!r}")
        line = {
            "time": round(self.now() if time is None else time, 6),
            "process": process,
            "type": type,
            "f": f,
            "key": key,
            "value": value,
        }
        with self._lock:
            if self._stream.closed:
                return
            self._stream.write(json.dumps(line, sort_keys=True) + "\n")
            self._stream.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            self._stream.close()


def read_lines(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every complete line of every file (a process killed mid-line leaves a torn last line,
    which is skipped: its operation then has no completion, as for a crash)."""
    out: list[dict[str, Any]] = []
    for n, path in enumerate(sorted(paths)):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            if isinstance(raw, dict) and raw.get("f") in OPS and raw.get("type") in TYPES:
                raw["_order"] = (n, i)
                out.append(raw)
    return out


def merge(paths: Sequence[Path], schedule: Schedule, stream: IO[str]) -> int:
    """Write the one history: the schedule line, every participant's lines in time order
    (ties keep each file's order), the end line. Returns the number of operations merged."""
    lines = read_lines(paths)
    lines.sort(key=lambda raw: (float(raw["time"]), raw["_order"]))
    last = [0.0]
    writer = HistoryWriter(stream, schedule, clock=lambda: last[0])
    for raw in lines:
        t = max(last[0], float(raw["time"]))
        last[0] = t
        writer.append(
            str(raw["process"]),
            str(raw["type"]),
            str(raw["f"]),
            str(raw["key"]),
            raw.get("value"),
            time=t,
        )
    writer.close()
    return len(lines)
