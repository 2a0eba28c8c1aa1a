"""`xenpv bench blk` report shape (the measurement itself runs in `xenpv bench blk --quick`)."""

from __future__ import annotations

import json

import pytest

from xenpv.bench import blk


def _r(iops: float) -> dict[str, float]:
    return {"iops": iops, "mbps": iops * 4096 / 1e6, "lat_us": 1e6 / iops, "guest_cpu_us": 50.0}


def test_report_with_and_without_nbdkit(capsys: pytest.CaptureFixture[str]) -> None:
    xenpv = {"4k/shm": {w.name: _r(1000.0) for w in blk.WORKLOADS}}
    nbdkit = {w.name: _r(4000.0) for w in blk.WORKLOADS}
    assert blk._report(xenpv, nbdkit, 1.0, 64) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ratio_vs_nbdkit"] == {name: 0.25 for name in blk.RATIOS}
    assert out["summary"]["randread_4k_qd32"] == {"4k/shm": 1000.0}
    assert blk._report(xenpv, None, 1.0, 64) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["ratio_vs_nbdkit"] == {name: None for name in blk.RATIOS}
    assert out["nbdkit"] == {"available": False, "install": blk.INSTALL_HINT}
    assert blk.INSTALL_HINT in " ".join(captured.err.split())  # rich may wrap it


def test_registered_as_a_bench() -> None:
    from xenpv.commands.bench import BENCH_MODULES

    assert "xenpv.bench.blk" in BENCH_MODULES
