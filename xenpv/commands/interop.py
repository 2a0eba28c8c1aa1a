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
import functools
import json
import sys
from pathlib import Path
from typing import Any

from xenpv import __version__
from xenpv.commands import args as types
from xenpv.errors import EXIT_FAILURE, EXIT_OK, UsageError
from xenpv.interop import report, runner
from xenpv.interop.matrix import enumerate_cells
from xenpv.toolstack import supervisor
from xenpv.toolstack.supervisor import Supervisor
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
    types.add_state_dir(parser, help="keep sockets, logs, results here")
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
    outcome: list[runner.Outcome] = []

    async def main(sup: Supervisor, state_dir: Path) -> int:
        outcome.append(await runner.run(state_dir, opts, cells, sup=sup))
        # A failed cell is a failed run: its logs stay (`supervisor.run_in_temp_dir`).
        return EXIT_OK if outcome[-1].to_json()["ok"] else EXIT_FAILURE

    if args.state_dir is not None:
        code = supervisor.run(
            functools.partial(main, state_dir=args.state_dir.resolve()), Supervisor()
        )
    else:
        code = supervisor.run_in_temp_dir("xenpv-interop-", main, Supervisor())
    if not outcome:
        return code
    result = outcome[0].to_json()
    result["run"] = run_options(args, opts, started)
    report.print_table(result)
    if args.report is not None:
        args.report.write_text(report.render_html(result))
        print(f"xenpv: report written to {args.report}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0 if result["ok"] else 1
