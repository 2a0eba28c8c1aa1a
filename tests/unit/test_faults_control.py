"""The fault run's control plane and history files: control node encoding, per-process logs
(torn lines after a kill), the merge into one chained history."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

from tests.unit.faults_helpers import fault, quiet_schedule
from xenpv.faults.control import (
    Control,
    Hits,
    ProcessLog,
    RunConfig,
    control_path,
    history_file,
    merge,
)
from xenpv.faults.history import parse_lines
from xenpv.faults.schedule import stream


def _config(tmp_path: Path) -> RunConfig:
    sched = quiet_schedule()
    return RunConfig(
        time.monotonic(), str(tmp_path), 5, {"backend": 1, "guest4k": 2}, sched.to_json()
    )


def test_control_round_trips_and_an_absent_node_means_no_run(tmp_path: Path) -> None:
    control = Control(_config(tmp_path), (fault("link.loss", "link:backend-guest4k"),), "probe")
    back = Control.decode(control.encode())
    assert back == control
    assert Control.decode(None) == Control(None)
    assert Control.decode(b"") == Control(None)
    assert Control.decode(b"{not json") == Control(None)  # unreadable: the safe reading
    assert control_path(3) == "/tool/xenpv/faults/3"
    assert control_path("xenstored") == "/tool/xenpv/faults/xenstored"


def test_process_log_lines_are_relative_to_the_epoch_and_survive_a_torn_line(
    tmp_path: Path,
) -> None:
    path = history_file(tmp_path, "guest4k")
    log = ProcessLog(path, time.monotonic() - 2.0)
    log.append("guest4k/blk0", "invoke", "write", "vbd:guest4k:51712:block=0", "t/0/1")
    log.close()
    first = json.loads(path.read_text().splitlines()[0])
    assert 2.0 <= first["time"] < 60.0
    with path.open("a") as f:
        f.write('{"time": 3.0, "process": "guest4k/blk0", "ty')  # killed mid-line
    again = ProcessLog(path, time.monotonic())
    again.append("guest4k.1/blk0", "invoke", "read", "vbd:guest4k:51712:block=0")
    again.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["process"] == "guest4k.1/blk0"  # its own line, not glued


def test_merge_orders_every_file_by_time_into_one_chained_history(tmp_path: Path) -> None:
    sched = quiet_schedule()
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(
        json.dumps({"time": 0.5, "process": "g/blk0", "type": "invoke", "f": "write",
                    "key": "vbd:g:1:block=0", "value": "v"}) + "\n"
        + json.dumps({"time": 1.5, "process": "g/blk0", "type": "ok", "f": "write",
                      "key": "vbd:g:1:block=0", "value": "v"}) + "\n"
        + "garbage line\n"
    )  # fmt: skip
    b.write_text(
        json.dumps({"time": 1.0, "process": "runner", "type": "info", "f": "fault-start",
                    "key": "x", "value": {"id": "f0.0", "kind": "link.loss", "target": "x"}})
        + "\n"
    )  # fmt: skip
    out = io.StringIO()
    assert merge([a, b], sched, out) == 3
    hist = parse_lines(out.getvalue().splitlines())
    assert hist.finished
    assert [op.f for op in hist] == ["schedule", "write", "fault-start", "write", "end"]
    assert [op.index for op in hist] == list(range(5))


def test_hits_count_probability_and_one_in() -> None:
    base = fault("grant.map-fail", "domain:guest4k", one_in=3)
    hits = Hits(base, stream(1, "x"))
    assert [hits.fires() for _ in range(6)] == [False, False, True, False, False, True]
    counted = Hits(dataclasses.replace(fault("event.drop", "domain:g"), count=2), stream(1, "y"))
    assert [counted.fires() for _ in range(4)] == [True, True, False, False]
    never = Hits(
        dataclasses.replace(fault("event.drop", "domain:g"), probability=0.0), stream(1, "z")
    )
    assert not any(never.fires() for _ in range(50))
