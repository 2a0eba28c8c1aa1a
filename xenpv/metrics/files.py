"""The state-dir channel of the counters: a domain process writes its snapshot to
`<state-dir>/metrics/<name>.json` every second (`xenpv domain --metrics-file`), and
`xenpv top` and `xenpv cluster status --json` read them. A small file replaced by rename is
the cheapest honest channel for per-second data: xenstore is not (every write is a
transaction, watches fire), and a reader needs no port to find.

A reader that needs counts up to a moment (the interop matrix reads a backend's counts around
each cell's workload) asks for a fresh file: SIGUSR1 makes the writer write at once, and the
file's `at` (the wall clock just before the counters were read) tells it when it has one
(`fresh_snapshot`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import trio

from xenpv.metrics.registry import snapshot

INTERVAL = 1.0
DIRECTORY = "metrics"
FRESH_SIGNAL = signal.SIGUSR1  # "write your snapshot now"
FRESH_POLL = 0.01  # seconds between looks at the file while waiting for a fresh one
STALE = 3.0  # a file older than this: its writer is gone (never signal its pid)


def metrics_path(state_dir: Path, name: str) -> Path:
    return state_dir / DIRECTORY / f"{name}.json"


def write_snapshot(path: Path) -> None:
    """Replace `path` with this process's snapshot, stamped with the wall clock (`at`) read
    before the counters: the snapshot holds everything counted up to `at`."""
    at = time.time()
    data = snapshot() | {"at": at, "pid": os.getpid()}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    tmp.replace(path)  # readers see the old file or the new one, never half of one


async def write_periodically(path: Path, interval: float = INTERVAL) -> None:
    """Write the snapshot now, every `interval` seconds and at each FRESH_SIGNAL, until
    cancelled; the file goes when the process stops (a reader then sees no counters rather
    than frozen ones), before the signal's default action (termination) is back."""
    _make_parent(path)
    with _fresh_requests() as requests:
        try:
            while True:
                write_snapshot(path)
                with trio.move_on_after(interval):
                    await requests.__anext__()
        finally:
            _remove(path)


@contextlib.contextmanager
def _fresh_requests() -> Iterator[AsyncIterator[int]]:
    """FRESH_SIGNAL's arrivals (none off the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield _never()
        return
    with trio.open_signal_receiver(FRESH_SIGNAL) as received:
        yield received


async def _never() -> AsyncIterator[int]:
    await trio.sleep_forever()
    yield 0  # pragma: no cover


def read_snapshot(path: Path) -> dict[str, Any] | None:
    """The snapshot in `path`, or None (missing, or being replaced)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


async def fresh_snapshot(path: Path) -> dict[str, Any]:
    """A snapshot of the process writing `path` holding every count up to now: ask it for
    one (FRESH_SIGNAL) and wait until the file's `at` is past now (callers bound the wait:
    without the process, none comes). Without the signal, the periodic write comes within
    an interval."""
    since = time.time()
    asked = False
    while True:
        snap = read_snapshot(path)
        if snap is not None:
            at = float(snap.get("at", 0))
            if at >= since:
                return snap
            if not asked and since - at < STALE:
                asked = True
                with contextlib.suppress(OSError, ValueError, TypeError):
                    os.kill(int(snap["pid"]), FRESH_SIGNAL)
        await trio.sleep(FRESH_POLL)


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
        value = read_snapshot(path)
        if value is not None:
            result[path.stem] = value
    return result
