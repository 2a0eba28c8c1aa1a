"""The command line every benchmark shares: `--quick`, `--json` and, for most, `--seconds`
and `--transport`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from xenpv.commands import args as types

TRANSPORTS = ("socket", "shm")  # the domain link transports a bench compares


def add_bench(
    benches: Any,
    name: str,
    *,
    help: str,
    run: Callable[[argparse.Namespace], int],
    seconds: float | None = None,
    seconds_help: str = "time per measurement",
    quick_help: str = "short runs (CI smoke test)",
    transport: bool = False,
) -> argparse.ArgumentParser:
    """Add `xenpv bench NAME` running `run`, with the shared options; `seconds` (the default
    of `--seconds`) adds that option too, `transport` adds `--transport` (see
    `chosen_transports`). Returns the parser for the bench's own options."""
    parser: argparse.ArgumentParser = benches.add_parser(name, help=help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="accepted; JSON is always last")
    if seconds is not None:
        parser.add_argument(
            "--seconds", type=types.positive_float, default=seconds, help=seconds_help
        )
    if transport:
        parser.add_argument(
            "--transport", choices=[*TRANSPORTS, "all"], default="all", help="domain link transport"
        )
    parser.set_defaults(run=run)
    return parser


def chosen_transports(args: argparse.Namespace) -> tuple[str, ...]:
    """The transports `--transport` asks for: one, or all of them."""
    return TRANSPORTS if args.transport == "all" else (args.transport,)
