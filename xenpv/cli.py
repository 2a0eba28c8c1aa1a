"""The one `xenpv` entry point.

Each subcommand lives in its own module (see `COMMAND_MODULES`) exposing
`register(subparsers)`, which adds its parser and sets `run=` to a callable
`(argparse.Namespace) -> int`. Errors derived from `XenpvError` print one line and exit 1;
Ctrl-C exits 130; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import structlog

from xenpv import __version__, log
from xenpv.errors import XenpvError

COMMAND_MODULES: tuple[str, ...] = (
    "xenpv.commands.bench",
    "xenpv.commands.xenstored",
    "xenpv.commands.domain",
    "xenpv.commands.cluster",
    "xenpv.commands.demo",
    "xenpv.commands.interop",
    "xenpv.commands.probe",
    "xenpv.commands.toolstack",
    "xenpv.commands.faults",
    "xenpv.commands.nbd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xenpv",
        description="Emulator of Xen's paravirtual split-driver model.",
    )
    parser.add_argument("--version", action="version", version=f"xenpv {__version__}")
    parser.add_argument(
        "--log-level", choices=log.LEVELS, default="info", help="log threshold (default: info)"
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log format on stderr (default: JSON unless stderr is a terminal)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    log.configure(args.log_level, json=json_logs)
    try:
        code: int = args.run(args)
    except XenpvError as exc:
        print(f"xenpv: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("xenpv: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: one line for the user, the details in the log
        structlog.get_logger().error("internal error", exc_info=True)
        print(f"xenpv: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 70
    return code


if __name__ == "__main__":
    sys.exit(main())
