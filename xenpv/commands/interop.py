"""`xenpv interop`: run the mixed-page-size interop matrix (see xenpv.interop).

Cells: guest page {4K,16K,64K} x backend page {4K,16K,64K} x grant-granule extension {off,on}
x device {vbd, vif} x feature profile {lean, full} (xenpv.interop.matrix), each verified and
measured in a real cluster. A table goes to stderr; `--json` prints one JSON object as the last
line of stdout; `--report FILE` writes a self-contained HTML page. Both say how the run was made
(`run`: version, date, `--quick` or full, transport, `--only`). Exit status 0 only if every
cell passed; after a failure the logs of a temporary state directory are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from xenpv import __version__
from xenpv.commands import args as types
from xenpv.commands.demo import remove_state_dir
from xenpv.errors import UsageError
from xenpv.interop import report, runner
from xenpv.interop.matrix import enumerate_cells
from xenpv.toolstack.topology import TRANSPORTS


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "interop", help="run the 4K/16K/64K page-size x grant-granule interop matrix"
    )
    parser.add_argument("--quick", action="store_true", help="short transfers (every cell runs)")
    parser.add_argument("--json", action="store_true", help="JSON result as the last stdout line")
    parser.add_argument(
        "--report", type=types.output_file, default=None, metavar="FILE", help="HTML report"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto")
    parser.add_argument(
        "--only",
        action="append",
        type=types.non_empty,
        default=None,
        metavar="TEXT",
        help="run only cells whose key contains TEXT, e.g. vbd-f64k or -on- (repeatable; "
        "for debugging a driver: the full matrix is the default)",
    )
    parser.add_argument(
        "--state-dir",
        type=types.directory,
        default=None,
        metavar="DIR",
        help="keep sockets, logs, results here",
    )
    parser.set_defaults(run=run)


def run_options(
    args: argparse.Namespace, opts: runner.Options, started: datetime.datetime
) -> dict[str, Any]:
    """What a reader of the report needs to know about how it was made."""
    return {
        "version": __version__,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": opts.quick,
        "transport": opts.transport,
        "only": list(args.only or []),
        "vbd_bytes": opts.vbd_bytes,
        "vif_frames": opts.vif_frames,
    }


def run(args: argparse.Namespace) -> int:
    opts = runner.Options(quick=args.quick, transport=args.transport, log_level=args.log_level)
    cells = enumerate_cells()
    if args.only:
        cells = [c for c in cells if any(text in c.key for text in args.only)]
        if not cells:
            raise UsageError(f"--only {' '.join(args.only)}: no cell key contains that")
    started = datetime.datetime.now(datetime.UTC)
    if args.state_dir is not None:
        result = trio.run(runner.run, args.state_dir.resolve(), opts, cells).to_json()
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="xenpv-interop-", dir="/tmp"))
        passed = False
        try:
            result = trio.run(runner.run, state_dir, opts, cells).to_json()
            passed = bool(result["ok"])
        finally:
            remove_state_dir(state_dir, keep_logs=not passed)
    result["run"] = run_options(args, opts, started)
    report.print_table(result)
    if args.report is not None:
        args.report.write_text(report.render_html(result))
        print(f"xenpv: report written to {args.report}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0 if result["ok"] else 1
