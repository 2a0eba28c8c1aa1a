"""`--mode sim` refusals and the history hash (the runs themselves: tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpv.faults import plan as plan_mod
from xenpv.faults.schedule import build
from xenpv.sim import faults as sim_faults


def test_process_faults_are_refused_before_anything_starts() -> None:
    schedule = build(plan_mod.load_any("process"), None)
    with pytest.raises(sim_faults.SimRunError, match="cannot inject process"):
        sim_faults.check_simulable(schedule)


def test_history_hash_is_of_the_lines(tmp_path: Path) -> None:
    one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_text(json.dumps({"time": 1.0, "f": "write"}) + "\n")
    two.write_text(json.dumps({"f": "write", "time": 1.0}) + "\n")  # key order is not content
    assert sim_faults.history_hash(one) == sim_faults.history_hash(two)
    two.write_text(json.dumps({"f": "write", "time": 1.5}) + "\n")
    assert sim_faults.history_hash(one) != sim_faults.history_hash(two)


def test_cli_refuses_sim_only_options_in_real_mode(capsys: pytest.CaptureFixture[str]) -> None:
    from xenpv.cli import main

    assert main(["faults", "run", "smoke", "--check-determinism"]) != 0
    assert "needs --mode sim" in capsys.readouterr().err
    assert main(["faults", "run", "process", "--mode", "sim"]) != 0
    assert "cannot inject process" in capsys.readouterr().err
