"""The JSONL history: chained digests name the first altered line; hashes ignore the clock."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.faults_helpers import DISK_KEY, Recorder
from xenpv.faults import history
from xenpv.faults.history import HistoryError, history_hash, parse_lines


def _sample() -> Recorder:
    rec = Recorder()
    key = DISK_KEY + ":block=0"
    rec("guest4k/blk0", "invoke", "write", key, "guest4k/0/1")
    rec("guest4k/blk0", "ok", "write", key, "guest4k/0/1")
    rec("guest4k/blk0", "invoke", "read", key)
    rec("guest4k/blk0", "ok", "read", key, "guest4k/0/1")
    return rec


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    rec = _sample()
    path = tmp_path / "h.jsonl"
    path.write_text(rec.text)
    h = history.read(path)
    assert [op.index for op in h] == list(range(5))
    assert h.ops[0].f == "schedule" and h.schedule == rec.schedule
    assert h.ops[4].value == "guest4k/0/1"


@pytest.mark.parametrize("line", [1, 2, 3, 4])
def test_any_alteration_names_the_first_altered_line(line: int) -> None:
    lines = _sample().text.splitlines()
    raw = json.loads(lines[line])
    raw["process"] = "someone-else"
    lines[line] = json.dumps(raw)
    with pytest.raises(HistoryError, match=rf"^test:{line + 1}: digest mismatch"):
        parse_lines(lines, "test")


def test_a_re_digested_alteration_is_caught_on_the_next_line() -> None:
    lines = _sample().text.splitlines()
    raw = json.loads(lines[2])
    raw["value"] = "forged"
    raw["digest"] = history.chain(
        json.loads(lines[1])["digest"], {k: raw[k] for k in history.FIELDS}
    )
    lines[2] = json.dumps(raw)
    with pytest.raises(HistoryError, match=r"^test:4: digest mismatch"):
        parse_lines(lines, "test")


def test_removed_and_malformed_lines() -> None:
    lines = _sample().text.splitlines()
    with pytest.raises(HistoryError, match=r"test:3: index 3, expected 2"):
        parse_lines(lines[:2] + lines[3:], "test")
    with pytest.raises(HistoryError, match=r"test:2: not JSON"):
        parse_lines([lines[0], "{oops"], "test")
    bad = json.loads(lines[1])
    bad["type"] = "maybe"
    with pytest.raises(HistoryError, match=r"test:2: type 'maybe' is not one of"):
        parse_lines([lines[0], json.dumps(bad)], "test")
    del bad["key"]
    with pytest.raises(HistoryError, match=r"test:2: missing field 'key'"):
        parse_lines([lines[0], json.dumps(bad)], "test")
    with pytest.raises(HistoryError, match=r"empty history"):
        parse_lines([], "test")
    with pytest.raises(HistoryError, match=r"test:1: the first line must be the schedule"):
        parse_lines(
            [history.encode(history.HistoryChain().line(0.0, "p", "info", "state", "k", 1))], "test"
        )


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="cannot read"):
        history.read(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe")
    with pytest.raises(HistoryError, match="not UTF-8"):
        history.read(tmp_path / "bin.jsonl")


def test_history_hash_ignores_time_but_not_content() -> None:
    a, b = _sample(), _sample()
    b.clock.now = 0.0  # different timings, same operations
    ha = parse_lines(a.text.splitlines())
    hb = parse_lines(b.text.splitlines())
    assert history_hash(ha.ops) == history_hash(hb.ops)
    c = Recorder()
    c("guest4k/blk0", "invoke", "write", DISK_KEY + ":block=1", "guest4k/1/1")
    assert history_hash(parse_lines(c.text.splitlines()).ops) != history_hash(ha.ops)


def test_threads_append_whole_lines_with_unique_indexes() -> None:
    rec = Recorder()

    def work(n: int) -> None:
        for i in range(200):
            rec.writer.append(f"t{n}", "info", "state", f"domain:t{n}", i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    h = parse_lines(rec.text.splitlines())
    assert len(h) == 1 + 4 * 200


def test_chain_rejects_unknown_ops() -> None:
    chain = history.HistoryChain()
    with pytest.raises(ValueError, match="op f 'dance'"):
        chain.line(0.0, "p", "info", "dance", "k", None)


@given(st.lists(st.one_of(st.text(max_size=80), st.sampled_from(_sample().text.splitlines()))))
def test_any_input_is_a_history_or_one_clear_error(lines: list[str]) -> None:
    try:
        parse_lines(lines, "fuzz")
    except HistoryError as exc:
        assert str(exc).startswith("fuzz")


def test_the_end_line_seals_the_history() -> None:
    rec = _sample()
    assert not rec.history().finished
    rec.writer.close()
    rec.writer.close()  # once
    h = rec.history()
    assert h.finished and h.ops[-1].value == {"lines": 6}
    with pytest.raises(ValueError, match="closed"):
        rec.writer.append("p", "info", "state", "k", 1)
    lines = rec.text.splitlines()
    extra = history.HistoryChain(json.loads(lines[-1])["digest"], 6).line(
        9.0, "p", "info", "state", "k", 1
    )
    with pytest.raises(HistoryError, match="test:7: a line after the end line"):
        parse_lines([*lines, history.encode(extra).strip()], "test")
