"""Presenting the matrix: a rich table on stderr and a self-contained HTML page.

The HTML page (`--report FILE`) has no external assets: inline CSS, one inline SVG bar chart
per device class (throughput per cell, extension off next to on, grouped by guest page size,
backend page size and feature profile, failed cells marked in red), the 64 KiB speed-ups, and
the full table with what both ends negotiated.
"""

from __future__ import annotations

import html
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from xenpv.metrics.counts import BACKEND_TIMING

COLUMNS = ("device", "guest", "backend", "ext", "features", "granule fe/be", "ok", "throughput")
# The terminal table fits 80 columns: short headers and features, units in the legend.
TERMINAL_COLUMNS = ("dev", "guest", "back", "ext", "features", "gran", "ok", "rate")
TERMINAL_LEGEND = (
    "guest/back: page size of the guest and of the backend domain; ext: grant-granule "
    "extension; features: profile, i = max indirect segments, r = ring page order, "
    "p = persistent grants, q = queues, sg = scatter-gather + GSO; gran: granule order "
    "frontend/backend; rate: vbd MB/s (write + read), vif Mbit/s (echoed)"
)


def _kib(size: int | None) -> str:
    return "-" if size is None else f"{size >> 10}K"


def _orders(record: dict[str, Any]) -> str:
    seen = record.get("negotiated") or {}
    fe = (seen.get("frontend") or {}).get("granule_order")
    be = (seen.get("backend") or {}).get("granule_order")
    return f"{'-' if fe is None else fe}/{'-' if be is None else be}"


# Each device's features as (label, terminal label, key of record["features"]).
_FEATURE_LABELS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "vbd": (
        ("ind", "i", "indirect_segments"),
        ("ring", "r", "ring_page_order"),
        ("pers", "p", "persistent"),
        ("q", "q", "queues"),
    ),
    "vif": (("q", "q", "queues"), ("sg/gso", "sg", "sg_gso")),
}


def _features(record: dict[str, Any], *, short: bool = False) -> str:
    """`max: ind 256, ring 4, pers 1, q 4`, or for a terminal `max i256 r4 p1 q4`."""
    f = record["features"]
    labels = _FEATURE_LABELS[record["device"]]
    if short:
        return " ".join([f["profile"], *(f"{tag}{int(f[key])}" for _, tag, key in labels)])
    return f"{f['profile']}: " + ", ".join(f"{label} {int(f[key])}" for label, _, key in labels)


def _throughput(record: dict[str, Any], *, unit: bool = True) -> str:
    value = record.get("mbps")
    if value is None:
        return "-"
    return f"{value:,.1f} {record.get('unit', '')}" if unit else f"{value:,.1f}"


def rows(records: list[dict[str, Any]], *, terminal: bool = False) -> list[list[str]]:
    """A row a cell; `terminal`: short enough for an 80-column terminal (see
    TERMINAL_LEGEND)."""
    return [
        [
            r["device"],
            _kib(r["frontend_page"]),
            _kib(r["backend_page"]),
            r["extension"],
            _features(r, short=terminal),
            _orders(r),
            "ok" if r["ok"] else "FAIL",
            _throughput(r, unit=not terminal),
        ]
        for r in records
    ]


def summary_lines(result: dict[str, Any]) -> list[str]:
    cells = result["cells"]
    failed = [c for c in cells if not c["ok"]]
    lines = [f"{len(cells) - len(failed)} of {len(cells)} cells passed"]
    s = result.get("speedup_64k", {})
    lines.append(
        "speed-up of a 64K guest with 64K granules over 4K splitting: "
        f"vbd {_ratio(s.get('vbd'))}, vif {_ratio(s.get('vif'))}"
    )
    detail = result.get("speedup_64k_detail") or {}
    per_profile = {k: v for k, v in detail.items() if k.count("-") == 1}
    if per_profile:
        lines.append(
            "  by profile: "
            + ", ".join(f"{PROFILE_LABELS.get(k, k)} {_ratio(v)}" for k, v in per_profile.items())
        )
    for c in failed[:12]:
        lines.append(f"FAIL {c['key']}: {c['detail']}")
    if len(failed) > 12:
        lines.append(f"... and {len(failed) - 12} more failed cells")
    return lines


PROFILE_LABELS = {
    "vbd-lean": "vbd without indirect (lean)",
    "vbd-full": "vbd with indirect (full)",
    "vif-lean": "vif, frames <= 1514 (lean)",
    "vif-full": "vif, 9000 + 64K GSO (full)",
}


def _ratio(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def print_table(result: dict[str, Any], file: TextIO | None = None) -> None:
    table = Table(title="xenpv interop: mixed page sizes x grant granules")
    for column in TERMINAL_COLUMNS:
        table.add_column(column, overflow="fold")  # wrap, never an ellipsis
    for row in rows(result["cells"], terminal=True):
        style = None if row[6] == "ok" else "red"
        table.add_row(*row, style=style)
    out = file or sys.stderr
    console = Console(file=out, width=None if out.isatty() else 80)
    run = run_line(result)
    if run:
        console.print(run, markup=False)
    console.print(table)
    console.print(TERMINAL_LEGEND, markup=False, style="dim")
    for line in summary_lines(result):
        console.print(line, markup=False)


def run_line(result: dict[str, Any]) -> str:
    """What was run, when and by which version (`result["run"]`, see `xenpv interop`)."""
    run = result.get("run")
    if not isinstance(run, dict):
        return ""
    mode = "quick run (--quick: short transfers)" if run.get("quick") else "full run"
    parts = [
        f"xenpv {run.get('version', '?')}",
        str(run.get("date", "?")),
        mode,
        f"transport {run.get('transport', '?')}",
    ]
    if run.get("vbd_bytes"):
        parts.append(f"{int(run['vbd_bytes']) >> 20} MiB per vbd cell")
    if run.get("vif_frames"):
        parts.append(f"{run['vif_frames']} frames per vif cell")
    if run.get("only"):
        parts.append("only cells matching " + ", ".join(map(str, run["only"])))
    return "; ".join(parts)


# -- HTML -----------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.summary { display: flex; gap: 1.5em; flex-wrap: wrap; }
.card { border: 1px solid #ccd; border-radius: 6px; padding: .6em 1em; background: #f7f8fc; }
.card b { font-size: 1.6em; display: block; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccd; padding: 2px 6px; text-align: left; }
th { background: #eef; } tr.fail td { background: #fdd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px;
  vertical-align: middle; }
svg text { font: 10px system-ui, sans-serif; fill: #333; }
"""
OFF_COLOUR = "#9aa5b8"
ON_COLOUR = "#2f6fdb"
FAIL_COLOUR = "#d33"


def _chart(records: list[dict[str, Any]], device: str) -> str:
    cells = [r for r in records if r["device"] == device]
    groups: dict[tuple[int, int, str], dict[str, dict[str, Any]]] = {}
    for r in cells:
        key = (r["frontend_page"], r["backend_page"], r["features"]["profile"])
        groups.setdefault(key, {})[r["extension"]] = r
    if not groups:
        return ""
    values = [float(r.get("mbps") or r.get("measured_mbps") or 0) for r in cells]
    values = [v for v in values if v > 0]
    top = max(values) if values else 1.0
    unit = cells[0].get("unit", "")
    bar, gap, left, height, bottom = 14, 14, 56, 220, 46
    width = left + len(groups) * (2 * bar + gap) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + bottom + 10}"'
        f' role="img" aria-label="{device} throughput per cell">'
    ]
    for i in range(5):
        value = top * i / 4
        y = 10 + height - height * i / 4
        out.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{width}" y2="{y:.1f}" stroke="#e3e3ea"/>'
        )
        out.append(f'<text x="{left - 6}" y="{y + 3:.1f}" text-anchor="end">{value:,.0f}</text>')
    out.append(
        f'<text x="12" y="{10 + height / 2}" transform="rotate(-90 12 {10 + height / 2})"'
        f' text-anchor="middle">{html.escape(unit)}</text>'
    )
    x = left
    previous_fe = None
    for (fe, be, profile), pair in groups.items():
        if previous_fe is not None and fe != previous_fe:
            sx, sy = x - gap / 2, 10 + height + bottom - 4
            out.append(
                f'<line x1="{sx}" y1="10" x2="{sx}" y2="{sy}" stroke="#889" stroke-dasharray="3"/>'
            )
        previous_fe = fe
        for j, ext in enumerate(("off", "on")):
            rec = pair.get(ext)
            bx = x + j * bar
            title = (
                html.escape(f"{rec['key']}: {_throughput(rec)} — {rec['detail']}") if rec else ""
            )
            if rec is not None and rec.get("ok") and rec.get("mbps"):
                h = height * float(rec["mbps"]) / top
                colour = ON_COLOUR if ext == "on" else OFF_COLOUR
                out.append(
                    f'<rect x="{bx}" y="{10 + height - h:.1f}" width="{bar - 2}" height="{h:.1f}"'
                    f' fill="{colour}"><title>{title}</title></rect>'
                )
            else:
                measured = rec.get("measured_mbps") if rec is not None else None
                if measured:  # measured, but the cell failed: an outline, not a bar
                    h = height * min(float(measured), top) / top
                    out.append(
                        f'<rect x="{bx + 0.5}" y="{10 + height - h:.1f}" width="{bar - 3}"'
                        f' height="{h:.1f}" fill="none" stroke="{FAIL_COLOUR}"'
                        f' stroke-dasharray="2"><title>{title}</title></rect>'
                    )
                out.append(
                    f'<rect x="{bx}" y="{10 + height - 10}" width="{bar - 2}" height="10"'
                    f' fill="{FAIL_COLOUR}"><title>{title or "missing"}</title></rect>'
                )
                out.append(f'<text x="{bx + 1}" y="{height - 2}" fill="{FAIL_COLOUR}">✗</text>')
        cx = x + bar
        out.append(
            f'<text x="{cx}" y="{10 + height + 12}" text-anchor="middle">g{fe >> 10}k</text>'
        )
        out.append(
            f'<text x="{cx}" y="{10 + height + 24}" text-anchor="middle">b{be >> 10}k</text>'
        )
        out.append(f'<text x="{cx}" y="{10 + height + 36}" text-anchor="middle">{profile}</text>')
        x += 2 * bar + gap
    out.append("</svg>")
    return "".join(out)


COUNT_KEYS = ("grant_ops_per_mib", "notifications_per_mib")
COUNT_LABELS = {
    "grant_ops_per_mib": "grant ops / MiB (exact)",
    "notifications_per_mib": "notifications / MiB (timing-dependent)",
}


def _count(record: dict[str, Any], key: str) -> float | None:
    value = (record.get("counts") or {}).get(key)
    return float(value) if isinstance(value, int | float) else None


def _count_chart(records: list[dict[str, Any]], device: str, key: str) -> str:
    """Bars of one count per MiB, off (4 KiB grants) next to on (the granule), per group."""
    groups: dict[tuple[int, int, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["device"] == device:
            group = (r["frontend_page"], r["backend_page"], r["features"]["profile"])
            groups.setdefault(group, {})[r["extension"]] = r
    values = [v for g in groups.values() for r in g.values() if (v := _count(r, key))]
    if not values:
        return ""
    top = max(values)
    bar, gap, left, height, bottom = 14, 14, 56, 160, 46
    width = left + len(groups) * (2 * bar + gap) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + bottom + 10}"'
        f' role="img" aria-label="{device} {html.escape(COUNT_LABELS[key])} per cell">'
    ]
    for i in range(5):
        y = 10 + height - height * i / 4
        out.append(
            f'<line x1="{left - 4}" y1="{y:.1f}" x2="{width}" y2="{y:.1f}" stroke="#e3e3ea"/>'
        )
        out.append(
            f'<text x="{left - 6}" y="{y + 3:.1f}" text-anchor="end">{top * i / 4:,.0f}</text>'
        )
    x = left
    for (fe, be, profile), pair in groups.items():
        for j, ext in enumerate(("off", "on")):
            rec = pair.get(ext)
            value = _count(rec, key) if rec is not None else None
            if rec is None or value is None:
                continue
            h = height * value / top
            colour = ON_COLOUR if ext == "on" else OFF_COLOUR
            title = html.escape(f"{rec['key']}: {value:,.1f} {COUNT_LABELS[key]}")
            out.append(
                f'<rect x="{x + j * bar}" y="{10 + height - h:.1f}" width="{bar - 2}"'
                f' height="{h:.1f}" fill="{colour}"><title>{title}</title></rect>'
            )
        cx = x + bar
        for row, text in enumerate((f"g{fe >> 10}k", f"b{be >> 10}k", profile)):
            out.append(
                f'<text x="{cx}" y="{10 + height + 12 * (row + 1)}" text-anchor="middle">'
                f"{html.escape(text)}</text>"
            )
        x += 2 * bar + gap
    out.append("</svg>")
    return "".join(out)


# (where in `counts`: None for the guest's, "backend" for the backend's; key; label)
COUNT_COLUMNS: tuple[tuple[str | None, str, str], ...] = (
    (None, "grant_ops_per_mib", "grant ops / MiB"),
    (None, "segments_per_mib", "segments / MiB"),
    (None, "ring_slots_per_mib", "ring slots / MiB"),
    (None, "grant_ops_per_request", "grant ops / request"),
    (None, "segments_per_request", "segments / request"),
    (None, "notifications_per_mib", "notifications / MiB"),
    (None, "notifications_per_request", "notifications / request"),
    ("backend", "copy_calls_per_mib", "backend copy calls / MiB"),
    ("backend", "copy_segments_per_mib", "backend copy segments / MiB"),
    ("backend", "map_segments_per_mib", "backend map segments / MiB"),
    ("backend", "unmap_segments_per_mib", "backend unmap segments / MiB"),
)


def _counts_table(records: list[dict[str, Any]]) -> list[str]:
    """Per cell: the guest's counts per MiB and per request and the backend's per MiB;
    exact ones marked as such."""
    counted = [r for r in records if r.get("counts")]
    if not counted:
        return []
    parts = ["<table><tr><th>cell</th>"]
    for where, key, label in COUNT_COLUMNS:
        name = key.removesuffix("_per_mib")
        timing = key.startswith("notifications") or (where == "backend" and name in BACKEND_TIMING)
        parts.append(f"<th>{html.escape(label)}<br>{'timing' if timing else 'exact'}</th>")
    parts.append("</tr>")
    for r in counted:
        parts.append(f"<tr><td>{html.escape(r['key'])}</td>")
        for where, key, _label in COUNT_COLUMNS:
            counts = r["counts"] if where is None else r["counts"].get(where) or {}
            value = counts.get(key)
            shown = "" if value is None else f"{value:,.2f}"
            parts.append(f"<td class='num'>{shown}</td>")
        parts.append("</tr>")
    parts.append("</table>")
    return parts


def _negotiated_text(record: dict[str, Any], end: str) -> str:
    seen = (record.get("negotiated") or {}).get(end) or {}
    return ", ".join(f"{k}={v}" for k, v in seen.items() if v is not None)


def render_html(result: dict[str, Any]) -> str:
    cells = result["cells"]
    passed = sum(1 for c in cells if c["ok"])
    s = result.get("speedup_64k", {})
    detail = result.get("speedup_64k_detail") or {}
    cards = [
        ("cells passed", f"{passed} / {len(cells)}"),
        ("vbd speed-up, 64K guest, 64K vs 4K grants", _ratio(s.get("vbd"))),
        ("vif speed-up, 64K guest, 64K vs 4K grants", _ratio(s.get("vif"))),
    ]
    cards += [
        (f"{PROFILE_LABELS.get(k, k)}", _ratio(v)) for k, v in detail.items() if k.count("-") == 1
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>xenpv interop matrix</title><style>",
        _CSS,
        "</style></head><body>",
        "<h1>xenpv interop: mixed page sizes and negotiated grant granules</h1>",
        f"<p class='run'><b>{html.escape(run_line(result) or 'run details not recorded')}</b></p>",
        "<p>Every cell is one device between a guest and a backend domain (separate processes)."
        " <i>off</i>: 4 KiB grants (a 16K/64K guest splits every page); <i>on</i>: the"
        " negotiated granule extension (docs/granule-extension.md). A cell passes when its"
        " data was verified and both ends state the expected granule order and features."
        " Speed-ups: a 64K guest with 64K granules over the same guest splitting into 4K"
        " grants, same backend and features (geometric mean over the backend page sizes)."
        " A 4K guest uses 4K grants either way: its off/on pairs show the measurement noise.</p>",
        "<div class='summary'>",
        *(f"<div class='card'>{html.escape(t)}<b>{html.escape(v)}</b></div>" for t, v in cards),
        "</div>",
    ]
    for device, what in (
        ("vbd", "block (MB/s, write + read)"),
        ("vif", "network (Mbit/s, echoed)"),
    ):
        parts.append(f"<h2>{device}: {what} throughput per cell</h2>")
        parts.append(
            f"<div class='legend'><span style='background:{OFF_COLOUR}'></span>extension off"
            f"<span style='background:{ON_COLOUR}'></span>extension on"
            f"<span style='background:{FAIL_COLOUR}'></span>failed (dashed outline: what it"
            " measured anyway). Each group: one guest page size (g), backend domain page size"
            " (b) and feature profile; the 64K-guest groups on the right answer the 4K-vs-64K"
            " question.</div>"
        )
        parts.append(_chart(cells, device))
    parts.append(
        "<h2>Operation counts: what each design costs the protocol</h2><p>Counted in the"
        " guest's process while the cell's workload ran (docs/metrics.md), per MiB moved:"
        " grant operations (grants issued and ended, and grant map/unmap/copy segments the"
        " guest issued) and notifications (events sent and received). Grant operations,"
        " segments and ring slots are <b>exact</b>: the same workload counts the same on any"
        " host. Notifications are <b>timing-dependent</b>: req_event/rsp_event suppress them"
        " while the other end is still busy. <i>off</i>: 4 KiB splitting; <i>on</i>: the"
        " negotiated granule. The <i>backend</i> columns are the grant copies, maps and"
        " unmaps the backend domain issued towards the guest over the same workload, read"
        " from the backend process's counters just before and after it: copy segments and"
        " bytes are exact; copy batches and persistent-grant maps depend on timing (exact for"
        " a vbd without persistent grants).</p>"
    )
    for device in ("vbd", "vif"):
        for key in COUNT_KEYS:
            chart = _count_chart(cells, device, key)
            if chart:
                parts.append(f"<h3>{device}: {html.escape(COUNT_LABELS[key])}</h3>{chart}")
    parts += _counts_table(cells)
    parts.append("<h2>All cells</h2><table><tr>")
    parts += [
        f"<th>{html.escape(c)}</th>"
        for c in (*COLUMNS, "frontend states", "backend states", "detail")
    ]
    parts.append("</tr>")
    for record, row in zip(cells, rows(cells), strict=True):
        parts.append(f"<tr class='{'ok' if record['ok'] else 'fail'}'>")
        for i, value in enumerate(row):
            cls = " class='num'" if i == len(row) - 1 else ""
            parts.append(f"<td{cls}>{html.escape(value)}</td>")
        for end in ("frontend", "backend"):
            parts.append(f"<td>{html.escape(_negotiated_text(record, end))}</td>")
        parts.append(f"<td>{html.escape(str(record.get('detail', '')))}</td></tr>")
    parts.append("</table>")
    parts.append(f"<p>Elapsed: {result.get('elapsed_s', '?')} s.</p></body></html>\n")
    return "".join(parts)
