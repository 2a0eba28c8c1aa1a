"""The state-dir channel of the counters: a domain process writes its snapshot to
`<state-dir>/metrics/<name>.json` every second (`xenpv domain --metrics-file`), and
`xenpv top` and `xenpv cluster status --json` read them. A small file replaced by rename is
the cheapest honest channel for per-second data: xenstore is not (every write is a
transaction, watches fire), and a reader needs no port to find.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import trio

from xenpv.metrics.registry import snapshot

INTERVAL = 1.0
DIRECTORY = "metrics"


def metrics_path(state_dir: Path, name: str) -> Path:
    return state_dir / DIRECTORY / f"{name}.json"


def write_snapshot(path: Path) -> None:
    """Replace `path` with this process's snapshot, stamped with the wall clock (`at`)."""
    data = snapshot() | {"at": time.time(), "pid": os.getpid()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    tmp.replace(path)  # readers see the old file or the new one, never half of one


async def write_periodically(path: Path, interval: float = INTERVAL) -> None:
    """Write the snapshot now and every `interval` seconds, until cancelled; the file goes
    when the process stops (a reader then sees no counters rather than frozen ones)."""
    _make_parent(path)
    try:
        while True:
            write_snapshot(path)
            await trio.sleep(interval)
    finally:
        _remove(path)


def _make_parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def read_all(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every process's last snapshot in `state_dir`, by process name (unreadable files, e.g.
    of a process being replaced, are skipped)."""
    result: dict[str, dict[str, Any]] = {}
    directory = state_dir / DIRECTORY
    if not directory.is_dir():
        return result
    for path in sorted(directory.glob("*.json")):
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            result[path.stem] = value
    return result
