"""`xenpv bench ring` smoke test: it runs, and its output has the documented shape.

Throughput is never asserted here (performance is measured by the benchmark, not by tests).
"""

from __future__ import annotations

import argparse
import json

import pytest

from xenpv.abi.blkif import BLKIF_X86_32
from xenpv.bench import ring


def test_cycles_run_through_the_public_api() -> None:
    result = ring.bench_cycles(BLKIF_X86_32, batch=8, pages=2, seconds=0.02)
    assert result["cycles"] > 0 and result["cycles"] % 8 == 0
    assert result["in_flight"] == 8 and result["ring_pages"] == 2
    # one push per direction per batch of 8, and notifies only when the peer re-armed
    assert 0 < result["notifies_per_cycle"] <= 2 / 8


def test_bench_prints_json_last(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    ring.BENCH.add_parser(parser.add_subparsers(), ring.run)
    args = parser.parse_args(["ring", "--quick", "--json", "--seconds", "0.01"])
    assert args.run(args) == 0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert (
        set(result["cycles_per_s"])
        == set(result["cycles_per_cpu_s"])
        == {"one-at-a-time", "batched"}
    )
    assert result["ring"]["batched"]["in_flight"] == 32
    assert result["ring"]["one-at-a-time"]["notifies_per_cycle"] == 2.0
    assert result["goal_cycles_per_s"] == 250_000
    assert "blkif ring" in out.err and "batched" in out.err
