"""The one `xenpv` entry point.

Each subcommand lives in its own module (see `COMMAND_MODULES`) exposing
`register(subparsers)`, which adds its parser and sets `run=` to a callable
`(argparse.Namespace) -> int`. Exit codes: 0 ok, 1 failure (a `XenpvError`, also inside an
exception group: its message is printed as one line), 2 usage (argparse), 130 interrupted
(Ctrl-C / SIGTERM; commands that start processes handle the signals through
`xenpv.toolstack.supervisor`), 70 an internal error; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import structlog
import trio

from xenpv import __version__, log
from xenpv.commands.args import ArgumentParser
from xenpv.errors import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    UsageError,
    XenpvError,
)

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
    "xenpv.commands.topology",
    "xenpv.commands.device",
    "xenpv.commands.k8s",
    "xenpv.commands.nbd",
    "xenpv.commands.top",
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run `xenpv ARGV`. `parser`: one built earlier (the fork server builds it once, before
    forking, so that a domain process does not import and register every command again)."""
    args = (parser or build_parser()).parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    log.configure(args.log_level, json=json_logs)
    interrupted = False
    errors: list[BaseException] = []
    notes: list[str] = []
    internal: list[BaseException] = []
    code = EXIT_FAILURE
    try:
        code = args.run(args)
    except* (KeyboardInterrupt, trio.Cancelled):
        interrupted = True
    except* XenpvError as group:
        errors = _leaves(group)
        notes = _notes(group)
    except* Exception as group:
        internal = _leaves(group)
    if interrupted or code == EXIT_INTERRUPTED:
        print("xenpv: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if errors:
        print(f"xenpv: error: {errors[0]}", file=sys.stderr)
        for note in notes:  # e.g. where the logs of a failed run were kept
            print(note, file=sys.stderr)
        return EXIT_USAGE if isinstance(errors[0], UsageError) else EXIT_FAILURE
    if internal:  # last resort: one line for the user, the details in the log
        exc = internal[0]
        structlog.get_logger().error("internal error", exc_info=exc)
        print(f"xenpv: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    return code


def _notes(exc: BaseException) -> list[str]:
    """The notes on `exc` and, for a group, on everything inside it."""
    found = list(getattr(exc, "__notes__", ()))
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found += _notes(inner)
    return found


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in `group`, nested groups opened, in order."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


if __name__ == "__main__":
    sys.exit(main())
