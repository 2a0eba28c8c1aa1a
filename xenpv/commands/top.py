"""`xenpv top [--state-dir DIR] [--once] [--json] [--interval S]`: a live view of a running
cluster's operation counters (docs/metrics.md).

Reads the snapshots the domain processes write to `<state-dir>/metrics/` every second; each
refresh shows the rates since the previous one. Interactive: a rich Live table, `q` or
Ctrl-C leaves and the terminal is restored. `--once`: one table (two samples an interval
apart) and exit; `--json`: the same rows as one JSON object on stdout, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from xenpv.commands.cluster import state_dir_arg
from xenpv.errors import EXIT_OK, UsageError
from xenpv.metrics.files import DIRECTORY, read_all
from xenpv.metrics.top import Row, rows


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "top", help="live per-domain operation rates of a running cluster"
    )
    state_dir_arg(parser)
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout, exit")
    parser.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="refresh period (default 1 s)"
    )
    parser.set_defaults(run=run)


def table(found: list[Row]) -> Table:
    view = Table(title="xenpv top", title_justify="left")
    for column in ("process", "domain", "peer", "state", "IOPS", "MB/s", "events/s"):
        view.add_column(column, justify="right" if column[0].isupper() else "left")
    view.add_column("grant ops/s", justify="right")
    view.add_column("errors", justify="right")
    view.add_column("drops", justify="right")
    for row in found:
        view.add_row(
            row.process,
            row.domain,
            row.peer,
            row.state,
            f"{row.iops:.0f}",
            f"{row.mb_per_s:.2f}",
            f"{row.events_per_s:.0f}",
            f"{row.grant_ops_per_s:.0f}",
            str(row.errors),
            str(row.drops),
        )
    if not found:
        view.caption = "no domain process has written counters yet"
    return view


def _sample(state_dir: Path, interval: float) -> list[Row]:
    before = read_all(state_dir)
    time.sleep(interval)
    return rows(before, read_all(state_dir), time.time())


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """stdin in cbreak mode while the view runs (a key is read at once, not echoed), restored
    however we leave; None when stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield sys.stdin
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(keys: Any, seconds: float) -> bool:
    """Wait `seconds`; True if `q` was pressed meanwhile."""
    if keys is None:
        time.sleep(seconds)
        return False
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([keys], [], [], left)
        if ready and keys.read(1) in ("q", "Q"):
            return True
    return False


def run(args: argparse.Namespace) -> int:
    if not args.interval > 0:
        raise UsageError(f"--interval must be positive, got {args.interval}")
    state_dir = Path(args.state_dir)
    if not (state_dir / DIRECTORY).is_dir() and not (state_dir / "cluster.json").exists():
        raise UsageError(f"no cluster in {state_dir}: start one with xenpv cluster up")
    if args.json:
        found = _sample(state_dir, args.interval)
        sys.stdout.write(json.dumps({"rows": [r.to_json() for r in found]}) + "\n")
        return EXIT_OK
    console = Console()
    if args.once:
        console.print(table(_sample(state_dir, args.interval)))
        return EXIT_OK
    before = read_all(state_dir)
    try:
        with _keys() as keys, Live(table([]), console=console, auto_refresh=False) as live:
            while not _wait_for_quit(keys, args.interval):
                after = read_all(state_dir)
                live.update(table(rows(before, after, time.time())), refresh=True)
                before = after
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves a live view: not an error
    return EXIT_OK
