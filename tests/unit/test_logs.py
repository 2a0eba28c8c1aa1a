"""`xenpv cluster logs`: JSON log lines → readable text (pure), and the file follower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpv.cli import main
from xenpv.toolstack.logs import LogFollower, format_entry, log_files, render


def entry(ts: str, event: str, level: str = "info", **fields: object) -> str:
    record = {"event": event, "level": level, "timestamp": f"2026-12-07T{ts}Z"} | fields
    return json.dumps(record)


def test_an_entry_is_one_readable_line() -> None:
    line = format_entry(
        "guest64k",
        entry("17:36:10.966387", "domain ready", page_size=65536, transport="auto", domain="g"),
    )
    expected = "17:36:10.966 guest64k  info    domain ready  page_size=65536  transport=auto"
    assert line.text == expected
    assert line.level == "info" and line.timestamp == "2026-12-07T17:36:10.966387Z"


def test_values_with_spaces_are_quoted_and_none_is_left_out() -> None:
    raw = entry("10:00:00.000001", "link down", reason="domain 2 closed", peer=None, ok=True)
    assert format_entry("b", raw).text.endswith('link down  reason="domain 2 closed"  ok=true')


def test_exceptions_follow_indented() -> None:
    raw = entry("10:00:00", "internal error", "error", exception="Traceback:\n  boom\nValueError")
    text = format_entry("x", raw).text
    assert text.splitlines()[1:] == ["    Traceback:", "      boom", "    ValueError"]


def test_non_json_lines_pass_through() -> None:
    line = format_entry("guest4k", "Fatal Python error: Aborted", name_width=9)
    assert line.text.endswith("guest4k    Fatal Python error: Aborted")
    assert line.level is None


def test_logs_merge_in_time_order_filter_and_keep_the_last() -> None:
    logs = {
        "xenstored": [entry("10:00:00.000", "xenstored ready"), ""],
        "guest": [
            entry("10:00:01.000", "setup", "debug"),
            entry("10:00:03.000", "gone", "warning"),
            "a stray stderr line",
        ],
        "backend": [entry("10:00:02.000", "switch up"), "not json {"],
    }
    lines = render(logs)
    assert [line[13:].split()[0] for line in lines] == [
        "xenstored",
        "guest",
        "backend",
        "backend",  # the unparsable line stays after the line before it
        "guest",
        "guest",
    ]
    assert all(line[13:23] == line[13:23].ljust(10) for line in lines)  # names aligned
    warnings = render(logs, min_level="warning")
    assert len(warnings) == 3 and "gone" in warnings[1]  # lines without a level are kept
    assert render(logs, last=2) == lines[-2:]


def test_follower_reads_appended_lines_and_restarts_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "g.log"
    follower = LogFollower(path)
    assert follower.read() == []  # not there yet
    path.write_text("one\ntw")
    assert follower.read() == ["one"]
    with path.open("a") as f:
        f.write("o\nthree\n")
    assert follower.read() == ["two", "three"]
    assert follower.read() == []
    path.write_text("new\n")  # a new cluster's log
    assert follower.read() == ["new"]


def test_cluster_logs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "xenstored.log").write_text(entry("10:00:00.000", "xenstored ready") + "\n")
    (logs / "guest4k.log").write_text(entry("10:00:01.000", "domain ready", domid=2) + "\n")
    assert list(log_files(logs)) == ["guest4k", "xenstored"]
    assert main(["cluster", "logs", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "10:00:00.000 xenstored  info    xenstored ready",
        "10:00:01.000 guest4k    info    domain ready  domid=2",
    ]
    assert main(["cluster", "logs", "guest4k", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "10:00:01.000 guest4k  info    domain ready  domid=2\n"
    assert main(["cluster", "logs", "guest9", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no log named 'guest9'" in err and "(logs: guest4k, xenstored)" in err
    assert main(["cluster", "logs", "--state-dir", str(tmp_path / "empty")]) == 2
    assert "no logs in" in capsys.readouterr().err


def test_failure_summary_is_one_readable_line() -> None:
    from xenpv.toolstack.logs import failure_summary

    started = entry("17:41:18.788", "store recovered", nodes=3)
    cli_error = "xenpv: error: cannot listen on tcp:127.0.0.1:46967: Address already in use"
    assert failure_summary(f"{started}\n{cli_error}\n") == (
        "cannot listen on tcp:127.0.0.1:46967: Address already in use"
    )
    usage = "xenpv xenstored: error: argument --data-dir: /x: exists and is not a directory"
    assert failure_summary(usage) == "argument --data-dir: /x: exists and is not a directory"
    crashed = entry("10:00:00.000", "cannot open store", "error", error="EIO")
    assert failure_summary(f"{started}\n{crashed}\n") == "cannot open store: EIO"
    assert failure_summary(started) == "17:41:18.788 info store recovered nodes=3"
    assert failure_summary("") == "no output"
