"""The interop report: terminal table and a self-contained HTML page."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from typing import Any

from xenpv.interop.matrix import enumerate_cells
from xenpv.interop.report import print_table, render_html, rows, run_line
from xenpv.interop.runner import Outcome
from xenpv.interop.verdict import judge, speedups


def _result(fail: frozenset[str] = frozenset()) -> dict[str, Any]:
    cells = enumerate_cells()
    records = []
    for cell in cells:
        if cell.key in fail:
            records.append(judge(cell, None))
            continue
        order = cell.expected_order
        fe: dict[str, Any] = {"granule_order": order, "queues": cell.profile.queues}
        be: dict[str, Any] = {"granule_order": order, "max_granule_order": cell.backend_max_order}
        if cell.device == "vbd":
            p = cell.features()
            fe |= {"ring_page_order": max(p["ring_page_order"], order)}
            fe["persistent"] = int(p["persistent"])
            be |= {"indirect_segments": p["indirect_segments"], "persistent": int(p["persistent"])}
        else:
            fe |= {"sg": 1, "gso_tcpv4": 1}
            be |= {"sg": 1, "gso_tcpv4": 1}
        mbps = 10.0 * (1 + order) + (5 if cell.device == "vif" else 0)
        records.append(
            judge(
                cell,
                {"key": cell.key, "ok": True, "detail": "verified", "mbps": mbps,
                 "negotiated": {"frontend": fe, "backend": be}},
            )
        )  # fmt: skip
    by_key = {r["key"]: r for r in records}
    return Outcome(records, speedups(cells, by_key), 12.5).to_json()


def test_json_schema() -> None:
    result = _result()
    json.loads(json.dumps(result))  # plain JSON
    assert set(result) >= {"cells", "speedup_64k", "ok"}
    assert set(result["speedup_64k"]) == {"vbd", "vif"}
    assert result["speedup_64k"]["vbd"] == 5.0  # 50 MB/s with 64K granules over 10
    assert result["ok"] is True
    for cell in result["cells"]:
        assert {"frontend_page", "backend_page", "granule", "device", "features", "ok", "mbps"} <= (
            set(cell)
        )
        assert set(cell["negotiated"]) == {"frontend", "backend"}
        assert cell["frontend_page"] in (4096, 16384, 65536)
        assert cell["device"] in ("vbd", "vif")


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_with_table_and_chart() -> None:
    failing = frozenset({"vif-f64k-b4k-on-full"})
    page = render_html(_result(failing))
    parser = _Collect()
    parser.feed(page)
    tags = [t for t, _a in parser.tags]
    # no external assets: no scripts, links, images or remote URLs
    assert "script" not in tags and "link" not in tags and "img" not in tags
    assert not re.search(r"""(src|href)\s*=""", page)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    assert tags.count("svg") == 2  # one chart per device class
    assert tags.count("tr") == 1 + 72
    assert tags.count("rect") >= 72
    text = "".join(parser.text)
    assert "71 / 72" in text
    assert "vif-f64k-b4k-on-full" in page  # the failed cell is named (bar tooltip, table)
    assert "5.00x" in text  # the vbd speed-up card


def test_terminal_table() -> None:
    result = _result(frozenset({"vbd-f4k-b4k-off-lean"}))
    assert len(rows(result["cells"])) == 72
    out = io.StringIO()
    print_table(result, file=out)
    text = out.getvalue()
    assert "71 of 72 cells passed" in text
    assert "FAIL vbd-f4k-b4k-off-lean" in text
    assert "speed-up of a 64K guest" in text


def test_terminal_table_fits_80_columns() -> None:
    result = _result(frozenset({"vif-f64k-b4k-on-full"}))
    out = io.StringIO()
    print_table(result, file=out)
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "full i256 r4 p1 q4" in text  # a whole vbd feature cell
    assert "rate: vbd MB/s" in text  # the legend gives the units


RUN = {
    "version": "0.9.0",
    "date": "2026-12-07 17:00 UTC",
    "quick": True,
    "transport": "auto",
    "only": [],
    "vbd_bytes": 2 << 20,
    "vif_frames": 48,
}


def test_report_says_how_it_was_run() -> None:
    result = _result() | {"run": RUN}
    line = run_line(result)
    assert "xenpv 0.9.0" in line and "2026-12-07 17:00 UTC" in line and "quick run" in line
    out = io.StringIO()
    print_table(result, file=out)
    assert "quick run (--quick" in out.getvalue()
    page = render_html(result)
    assert "2026-12-07 17:00 UTC" in page and "quick run" in page and "xenpv 0.9.0" in page
    full = run_line(_result() | {"run": RUN | {"quick": False, "only": ["vbd-f64k"]}})
    assert "full run" in full and "only cells matching vbd-f64k" in full
    assert run_line(_result()) == ""  # an old result without run details
