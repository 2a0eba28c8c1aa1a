"""The command line every benchmark shares: `--quick`, `--json` and, for most, `--seconds`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from xenpv.commands import args as types


def add_bench(
    benches: Any,
    name: str,
    *,
    help: str,
    run: Callable[[argparse.Namespace], int],
    seconds: float | None = None,
    seconds_help: str = "time per measurement",
    quick_help: str = "short runs (CI smoke test)",
) -> argparse.ArgumentParser:
    """Add `xenpv bench NAME` running `run`, with the shared options; `seconds` (the default
    of `--seconds`) adds that option too. Returns the parser for the bench's own options."""
    parser: argparse.ArgumentParser = benches.add_parser(name, help=help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="accepted; JSON is always last")
    if seconds is not None:
        parser.add_argument(
            "--seconds", type=types.positive_float, default=seconds, help=seconds_help
        )
    parser.set_defaults(run=run)
    return parser
