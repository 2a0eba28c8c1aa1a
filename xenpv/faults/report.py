"""The HTML timeline of one run: a self-contained page (inline CSS and SVG, no assets).

One lane per domain and per device with the faults that touched it as bands; xenbus-state
swimlanes per device end; operation latency over time with fault windows shaded and failed
operations in red; the verdict with the first violation explained; the seed, the schedule and
history hashes and a one-line command to run the same schedule again.
"""

from __future__ import annotations

import html
import shlex
from collections.abc import Sequence

from xenpv.faults.checkers import Violation
from xenpv.faults.checkers.common import FaultWindow, fault_windows
from xenpv.faults.history import History, history_hash

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.summary { display: flex; gap: 1.5em; flex-wrap: wrap; }
.card { border: 1px solid #ccd; border-radius: 6px; padding: .6em 1em; background: #f7f8fc; }
.card b { font-size: 1.3em; display: block; }
.pass { color: #1a7f37; } .fail { color: #d33; }
code { background: #f2f2f6; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccd; padding: 2px 6px; text-align: left; }
th { background: #eef; }
svg text { font: 10px system-ui, sans-serif; fill: #333; }
"""
FAMILY_COLOURS = {
    "event": "#f4a261",
    "grant": "#e76f51",
    "ring": "#9b5de5",
    "xenstore": "#2a9d8f",
    "process": "#d62828",
    "link": "#457b9d",
    "storage": "#8d6e63",
    "device": "#6c757d",
}
STATE_COLOURS = {
    1: "#ffe8a3",  # Initialising
    2: "#ffd166",  # InitWait
    3: "#cde99b",  # Initialised
    4: "#52b788",  # Connected
    5: "#f4978e",  # Closing
    6: "#adb5bd",  # Closed
}
STATE_NAMES = {
    0: "Unknown",
    1: "Initialising",
    2: "InitWait",
    3: "Initialised",
    4: "Connected",
    5: "Closing",
    6: "Closed",
    7: "Reconfiguring",
    8: "Reconfigured",
}
DOMAIN_STATES = {"up": 4, "down": 6}  # a domain process lane, in the xenbus colours
LEFT, WIDTH, LANE = 190, 900, 18


def _colour(kind: str) -> str:
    return FAMILY_COLOURS.get(kind.split(".")[0], "#999")


def _state_number(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    for number, name in STATE_NAMES.items():
        if isinstance(value, str) and value.endswith(name):
            return number
    return 0


class _Scale:
    def __init__(self, end: float) -> None:
        self.end = max(end, 1e-3)

    def x(self, t: float) -> float:
        return LEFT + WIDTH * min(max(t, 0.0), self.end) / self.end

    def window(self, w: FaultWindow) -> tuple[float, float]:
        """Where a fault window's bar starts and how wide it is (an open window runs to the
        end; a short one still shows)."""
        x0 = self.x(w.start_time)
        x1 = self.x(w.stop_time if w.stop_time is not None else self.end)
        return x0, max(x1 - x0, 2)


def _axis(scale: _Scale, y: float) -> list[str]:
    out = [f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + WIDTH}" y2="{y}" stroke="#889"/>']
    for i in range(11):
        t = scale.end * i / 10
        x = scale.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#889"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 14}" text-anchor="middle">{t:.1f}s</text>')
    return out


def _lanes(history: History, windows: Sequence[FaultWindow], scale: _Scale) -> str:
    targets = history.schedule.topology
    lanes: list[tuple[str, str]] = [("xenstored", "xenstored")]
    lanes += [(f"domain:{n}", f"{n} ({r})") for n, r in targets.roles.items()]
    lanes += [(d.id, d.id[len("device:") :]) for d in targets.devices]
    height = LANE * len(lanes) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 20}" height="{height}">'
    ]
    for i, (lane, label) in enumerate(lanes):
        y = i * LANE
        out.append(
            f'<rect x="{LEFT}" y="{y + 2}" width="{WIDTH}" height="{LANE - 4}" fill="#f4f5fa"/>'
        )
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>'
        )
        for w in windows:
            hit = w.target == lane or (
                w.target.startswith("queue:")
                and w.target.startswith(lane.replace("device:", "queue:"))
            )
            if w.target.startswith("link:") and lane.startswith("domain:"):
                try:
                    hit = lane[len("domain:") :] in targets.link_ends(w.target)
                except KeyError:
                    hit = False
            if not hit:
                continue
            x0, width = scale.window(w)
            out.append(
                f'<rect x="{x0:.1f}" y="{y + 2}" width="{width:.1f}" height="{LANE - 4}"'
                f' fill="{_colour(w.kind)}" opacity="0.85"><title>{html.escape(w.label())}'
                f" {w.start_time:.3f}-{'' if w.stop_time is None else f'{w.stop_time:.3f}'}s"
                "</title></rect>"
            )
    out += _axis(scale, LANE * len(lanes) + 4)
    out.append("</svg>")
    return "".join(out)


def _states(history: History, scale: _Scale) -> str:
    targets = history.schedule.topology
    rows = [
        (f"state:{d.guest}:{d.cls}:{d.name}:{end}", f"{d.guest} {d.cls} {d.name} {end[:5]}")
        for d in targets.devices
        for end in ("frontend", "backend")
    ]
    # A domain's process lane: shown once it went down (up: Connected's colour, down: Closed's).
    downs = {op.key for op in history if op.f == "state" and op.key.startswith("domain:")}
    rows += [(key, f"{key.removeprefix('domain:')} process") for key in sorted(downs)]
    changes: dict[str, list[tuple[float, int]]] = {key: [] for key, _ in rows}
    for key in downs:
        changes[key].append((0.0, DOMAIN_STATES["up"]))
    for op in history:
        if op.f == "state" and op.key in changes:
            number = (
                DOMAIN_STATES.get(str(op.value), 0) if op.key in downs else _state_number(op.value)
            )
            changes[op.key].append((op.time, number))
    end = max(scale.end, history.end_time)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 20}"'
        f' height="{LANE * len(rows) + 30}">'
    ]
    for i, (key, label) in enumerate(rows):
        y = i * LANE
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 13}" text-anchor="end">{html.escape(label)}</text>'
        )
        points = changes[key]
        for j, (t, state) in enumerate(points):
            t1 = points[j + 1][0] if j + 1 < len(points) else end
            x0, x1 = scale.x(t), scale.x(t1)
            out.append(
                f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(x1 - x0, 1):.1f}" height="{LANE - 4}"'
                f' fill="{STATE_COLOURS.get(state, "#ddd")}"><title>{STATE_NAMES.get(state, state)}'
                f" from {t:.3f}s</title></rect>"
            )
    out += _axis(scale, LANE * len(rows) + 4)
    out.append("</svg>")
    return "".join(out)


def _latency(history: History, windows: Sequence[FaultWindow], scale: _Scale) -> str:
    invokes: dict[str, tuple[float, str]] = {}
    points: list[tuple[float, float, bool, str]] = []
    for op in history:
        if op.f not in ("write", "read", "flush", "send", "xs-write", "xs-read", "probe"):
            continue
        if op.type == "invoke":
            invokes[op.process] = (op.time, op.f)
        elif op.process in invokes:
            t0, f = invokes.pop(op.process)
            points.append((t0, op.time - t0, op.type == "ok", f"{f} {op.key} {op.type}"))
    height = 200
    top = max((p[1] for p in points), default=0.0) or 1e-3
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 20}"'
        f' height="{height + 40}">'
    ]
    for w in windows:
        x0, width = scale.window(w)
        out.append(
            f'<rect x="{x0:.1f}" y="0" width="{width:.1f}" height="{height}"'
            f' fill="{_colour(w.kind)}" opacity="0.18">'
            f"<title>{html.escape(w.label())}</title></rect>"
        )
    for i in range(5):
        value = top * i / 4
        y = height - height * i / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + WIDTH}" y2="{y:.1f}" stroke="#e3e3ea"/>'
        )
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 3:.1f}" text-anchor="end">{value * 1000:.1f} ms</text>'
        )
    step = max(1, len(points) // 4000)  # keep the page light on long runs
    for t, latency, ok, title in points[::step]:
        x = scale.x(t)
        y = height - height * latency / top
        colour = "#2f6fdb" if ok else "#d33"
        out.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{1.6 if ok else 3}" fill="{colour}">'
            f"<title>{html.escape(title)} {latency * 1000:.2f} ms</title></circle>"
        )
    out += _axis(scale, height + 4)
    out.append("</svg>")
    return "".join(out)


def rerun_command(history: History) -> str:
    s = history.schedule
    return f"xenpv faults run {shlex.quote(s.source or s.plan)} --seed {s.seed}"


def render_html(history: History, violations: Sequence[Violation]) -> str:
    s = history.schedule
    windows = fault_windows(history)
    scale = _Scale(max(s.duration, history.end_time))
    ok = not violations
    verdict = "PASS" if ok else f"FAIL: {len(violations)} violation(s)"
    cards = [
        ("verdict", verdict),
        ("plan", s.plan),
        ("seed", str(s.seed)),
        ("faults injected", str(len(windows))),
        ("operations", str(len(history))),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>xenpv faults: {html.escape(s.plan)} seed {s.seed}</title><style>",
        _CSS,
        "</style></head><body>",
        f"<h1>xenpv faults: plan {html.escape(s.plan)}, seed {s.seed}</h1>",
        "<div class='summary'>",
        *(
            f"<div class='card'>{html.escape(t)}<b class='{'pass' if ok else 'fail'}'>"
            f"{html.escape(v)}</b></div>"
            if t == "verdict"
            else f"<div class='card'>{html.escape(t)}<b>{html.escape(v)}</b></div>"
            for t, v in cards
        ),
        "</div>",
        f"<p>Schedule hash <code>{s.hash}</code><br>History hash <code>{history_hash(history.ops)}"
        f"</code><br>Run it again: <code>{html.escape(rerun_command(history))}</code></p>",
    ]
    if violations:
        first = violations[0]
        parts.append(
            "<h2>First violation</h2><p class='fail'>"
            f"[{html.escape(first.checker)}] at op {first.index}, key <code>"
            f"{html.escape(first.key)}</code>, value <code>{html.escape(repr(first.value))}</code>:"
            f" {html.escape(first.message)}. Faults active then: "
            f"{html.escape(', '.join(first.active) or 'none')}.</p>"
        )
    parts.append("<h2>Faults per domain and device</h2>")
    parts.append(
        "<div>"
        + "".join(
            f"<span style='display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;"
            f"background:{c}'></span>{f}"
            for f, c in FAMILY_COLOURS.items()
        )
        + "</div>"
    )
    parts.append(_lanes(history, windows, scale))
    parts.append("<h2>Xenbus states</h2>")
    parts.append(_states(history, scale))
    parts.append("<h2>Operation latency (failed in red; faults shaded)</h2>")
    parts.append(_latency(history, windows, scale))
    parts.append("<h2>Faults</h2><table><tr><th>id</th><th>kind</th><th>target</th>")
    parts.append("<th>start</th><th>stop</th></tr>")
    for w in windows:
        stop = "never" if w.stop_time is None else f"{w.stop_time:.3f}"
        parts.append(
            f"<tr><td>{html.escape(w.id)}</td><td>{html.escape(w.kind)}</td>"
            f"<td>{html.escape(w.target)}</td><td>{w.start_time:.3f}</td><td>{stop}</td></tr>"
        )
    parts.append("</table>")
    if violations:
        parts.append("<h2>All violations</h2><table><tr><th>checker</th><th>op</th><th>key</th>")
        parts.append("<th>value</th><th>what</th><th>faults active</th></tr>")
        for v in violations[:500]:
            parts.append(
                f"<tr><td>{html.escape(v.checker)}</td><td>{v.index}</td>"
                f"<td>{html.escape(v.key)}</td><td>{html.escape(repr(v.value))}</td>"
                f"<td>{html.escape(v.message)}</td><td>{html.escape(', '.join(v.active))}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "".join(parts)
