"""`xenpv interop --quick --json` as CI runs it: every cell must pass.

One run of the whole matrix (separate xenstored, backend-domain and guest processes) feeds
every test here; a second, smaller run covers the socket-copy transport.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.integration.hv_pair import REPO
from xenpv.interop import runner
from xenpv.interop.matrix import enumerate_cells

pytestmark = pytest.mark.slow  # ~20-90 s in all, in the default run (CI runs it)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    report = tmp_path_factory.mktemp("interop") / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "xenpv", "interop", "--quick", "--json", "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=420,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.stdout, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    result["_returncode"] = proc.returncode
    result["_stderr"] = proc.stderr
    result["_report"] = report
    return result


def _failed(cells: list[dict[str, Any]]) -> list[str]:
    return [f"{c['key']}: {c['detail']}" for c in cells if c["ok"] is not True]


def test_every_cell_reported_with_both_ends(matrix: dict[str, Any]) -> None:
    keys = [c["key"] for c in matrix["cells"]]
    assert keys == [c.key for c in enumerate_cells()]  # --quick never drops a cell
    for cell in matrix["cells"]:
        assert set(cell["negotiated"]) == {"frontend", "backend"}, cell["key"]
        assert cell["features"]["profile"] in ("lean", "full")
    assert set(matrix["speedup_64k"]) == {"vbd", "vif"}
    assert "cells passed" in matrix["_stderr"]
    page = Path(matrix["_report"]).read_text()
    # two throughput charts, then the counts per MiB charts (docs/metrics.md)
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 3


def test_baseline_cells_all_pass(matrix: dict[str, Any]) -> None:
    """Extension off: 4 KiB grants between every pair of page sizes, every feature profile
    (a failure here names the baseline, whatever the extension cells do)."""
    baseline = [c for c in matrix["cells"] if c["extension"] == "off"]
    assert len(baseline) == 36
    assert not _failed(baseline)
    for cell in baseline:
        assert cell["granule"] == 4096
        assert cell["mbps"] > 0


def test_every_cell_passes(matrix: dict[str, Any]) -> None:
    """The acceptance criterion: every cell, extension on included, verified and agreed."""
    assert not _failed(matrix["cells"])
    assert matrix["ok"] is True and matrix["_returncode"] == 0
    for cell in matrix["cells"]:
        assert cell["granule"] == cell["expected_granule"]
    assert matrix["speedup_64k"]["vbd"] is not None
    assert matrix["speedup_64k"]["vif"] is not None


def test_socket_transport_subset(tmp_path: Path) -> None:
    """The 64K guest against a 4K-page backend domain, extension off and on (and the 4K
    guest's cells as controls), over the socket-copy transport."""
    cells = [
        c for c in enumerate_cells() if c.backend_page == 4096 and c.frontend_page in (4096, 65536)
    ]
    opts = runner.Options(quick=True, transport="socket")

    async def main() -> runner.Outcome:
        with trio.fail_after(240):
            return await runner.run(tmp_path, opts, cells)

    outcome = trio.run(main)
    assert [c["key"] for c in outcome.cells] == [c.key for c in cells]
    assert not _failed(outcome.cells)


def test_every_cell_carries_its_counts(matrix: dict[str, Any]) -> None:
    """Operation counts per MiB (docs/metrics.md): a 64K guest's block cells grant far fewer
    segments per MiB with 64 KiB granules than splitting into 4 KiB grants (16 times fewer
    for the bulk data; the workload's small tagged extents and indirect pages dilute it)."""
    for cell in matrix["cells"]:
        counts = cell["counts"]
        assert {"grant_ops_per_mib", "segments_per_mib", "notifications_per_mib"} <= set(counts)
    by_key = {c["key"]: c for c in matrix["cells"]}
    for key, cell in by_key.items():
        if key.startswith("vbd-f64k-") and cell["extension"] == "off":
            on = by_key[key.replace("-off-", "-on-")]
            if cell["features"]["persistent"] or on["granule"] != 65536:
                continue  # persistent grants are reused; a smaller granule divides less
            off_segments = cell["counts"]["segments_per_mib"]
            on_segments = on["counts"]["segments_per_mib"]
            assert off_segments >= 8 * on_segments, (key, off_segments, on_segments)


def test_every_cell_carries_the_backends_counts(matrix: dict[str, Any]) -> None:
    """The backend's grant operations towards the guest (docs/metrics.md): without persistent
    grants blkback copies (or maps) every data segment the guest granted, once; a 64K guest's
    backend copies at least 8 times more segments per MiB with 4 KiB splitting than with 64
    KiB granules (16 times for the bulk data); netback copies every echoed byte four times
    (in from A, out to B, in from B, out to A)."""
    by_key = {c["key"]: c for c in matrix["cells"]}
    for key, cell in by_key.items():
        guest, backend = cell["counts"]["totals"], cell["counts"]["backend"]
        assert backend["exact"] == ["copy_segments", "copy_bytes"], key
        copied = backend["totals"]
        if cell["device"] == "vif":
            assert copied["copy_bytes"] >= 4 * cell["counts"]["bytes"], key
        elif not cell["features"]["persistent"]:  # each granted segment copied or mapped
            assert copied["copy_segments"] + copied["map_segments"] == guest["segments"], key
        if key.startswith("vbd-f64k-") and cell["extension"] == "off":
            on = by_key[key.replace("-off-", "-on-")]
            if cell["features"]["persistent"] or on["granule"] != 65536:
                continue
            off_copies = backend["copy_segments_per_mib"]
            on_copies = on["counts"]["backend"]["copy_segments_per_mib"]
            assert off_copies >= 8 * on_copies, (key, off_copies, on_copies)
