"""Reading a cluster's logs: `<state-dir>/logs/<name>.log`, one JSON object per line (what
structlog writes for xenstored and every domain process), as lines a person reads.

    17:36:10.966 guest64k  info    domain ready  page_size=65536 transport=auto

`format_entry` and `render` are pure (JSON text in, text out); `LogFollower` is the file
side: it reads what was appended since the last call, and starts over when a new cluster
truncated or replaced the file. Lines that are not JSON (a crash's traceback on stderr) are
shown as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
# Keys every line has, shown in their own columns (or implied by the file's name).
_SHOWN = ("timestamp", "level", "event", "domain", "exception")
LEVEL_WIDTH = 8


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of one log: its sort key (the timestamp text, "" if none) and its text."""

    timestamp: str
    level: str | None
    text: str


def _value(value: Any) -> str:
    if isinstance(value, str):
        return (
            value
            if value and not any(c.isspace() or c in "\"'=" for c in value)
            else (json.dumps(value))
        )
    return json.dumps(value, sort_keys=True, default=str)


def _clock(timestamp: Any) -> str:
    """`2026-12-07T17:36:10.966387Z` → `17:36:10.966` (the logs of one run share a day)."""
    text = str(timestamp or "")
    _date, sep, time = text.partition("T")
    if not sep:
        return text[:12]
    return time.rstrip("Z")[:12]


def format_entry(source: str, line: str, *, name_width: int = 0) -> LogLine:
    """One raw log line of `source` (a domain name or `xenstored`) as readable text."""
    raw = line.rstrip("\n")
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        return LogLine("", None, f"{'':12} {source:<{name_width}}  {raw}")
    level = str(entry.get("level", "")).lower()
    fields = "  ".join(
        f"{k}={_value(v)}" for k, v in entry.items() if k not in _SHOWN and v is not None
    )
    event = str(entry.get("event", ""))
    text = f"{_clock(entry.get('timestamp')):<12} {source:<{name_width}}  {level:<{LEVEL_WIDTH}}"
    text += event + (f"  {fields}" if fields else "")
    exception = entry.get("exception")
    if exception:
        text += "".join(f"\n    {part}" for part in str(exception).rstrip().splitlines())
    return LogLine(str(entry.get("timestamp", "")), level, text)


def at_least(level: str | None, threshold: str) -> bool:
    """Whether `level` is `threshold` or more severe (a line without a level always is)."""
    if level is None or level not in LEVELS:
        return True
    return LEVELS.index(level) >= LEVELS.index(threshold)


def render(
    logs: dict[str, Iterable[str]], *, min_level: str = "debug", last: int | None = None
) -> list[str]:
    """The lines of several logs (`{source: raw lines}`), merged in timestamp order (a line
    without one stays after the line before it), filtered by level; the `last` N only."""
    width = max((len(name) for name in logs), default=0)
    merged: list[tuple[str, int, LogLine]] = []
    for name, lines in logs.items():
        previous = ""
        for raw in lines:
            if not raw.strip():
                continue
            formatted = format_entry(name, raw, name_width=width)
            previous = formatted.timestamp or previous
            if at_least(formatted.level, min_level):
                merged.append((previous, len(merged), formatted))
    merged.sort(key=lambda item: (item[0], item[1]))
    texts = [item[2].text for item in merged]
    return texts[-last:] if last is not None else texts


def log_files(logs_dir: Path) -> dict[str, Path]:
    """`{name: path}` of every `<name>.log` in `logs_dir`, sorted by name."""
    try:
        found = sorted(p for p in logs_dir.iterdir() if p.suffix == ".log" and p.is_file())
    except OSError:
        return {}
    return {p.stem: p for p in found}


@dataclass(slots=True)
class LogFollower:
    """Reads the lines appended to a log file since the last `read`."""

    path: Path
    offset: int = 0
    inode: int | None = None
    partial: bytes = field(default=b"")

    def read(self) -> list[str]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            # a new cluster replaced or truncated the log: read it from its start
            self.inode, self.offset, self.partial = st.st_ino, 0, b""
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(st.st_size - self.offset)
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def follow_lines(
    followers: dict[str, LogFollower], *, min_level: str, name_width: int
) -> Iterator[str]:
    """One pass over `followers`: the new lines of each, formatted, in file order."""
    for name, follower in followers.items():
        for raw in follower.read():
            if not raw.strip():
                continue
            line = format_entry(name, raw, name_width=name_width)
            if at_least(line.level, min_level):
                yield line.text


def last_logged_error(lines: Sequence[str]) -> str | None:
    """`event: error` of the last error-level JSON entry among `lines`, if there is one."""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            error = entry.get("error")
            return str(entry.get("event", "")) + (f": {error}" if error else "")
    return None


def failure_summary(text: str) -> str:
    """One readable line saying why a process that wrote the log `text` stopped: its last
    one-line CLI error (`xenpv ...: error: MESSAGE`), else its last error-level JSON entry
    (`event: error`), else its last line as `format_entry` shows it."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        prefix, sep, message = line.partition(": error: ")
        if sep and prefix.startswith("xenpv"):
            return message.strip()
    last = last_logged_error(lines)
    if last is not None:
        return last
    if not lines:
        return "no output"
    return " ".join(format_entry("", lines[-1]).text.split())
