"""The command line every benchmark shares: `--quick`, `--json` and, for most, `--seconds`
and `--transport`."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from xenpv.commands import args as types
from xenpv.toolstack import supervisor
from xenpv.toolstack.supervisor import Supervisor

T = TypeVar("T")

TRANSPORTS = ("socket", "shm")  # the domain link transports a bench compares


@dataclass(frozen=True)
class Option:
    """One of a bench's own options: the arguments of `parser.add_argument`."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def option(*flags: str, **kwargs: Any) -> Option:
    """A bench's own option, written as the `parser.add_argument` call it stands for."""
    return Option(flags, kwargs)


SCRATCH_DIR = option(
    "--dir", type=types.existing_dir, default=None, help="directory for the scratch image"
)


@dataclass(frozen=True)
class Bench:
    """What `xenpv bench NAME` shows and takes: the shared options, `--seconds` when
    `seconds` (its default) is set, `--transport` when `transport` (see `chosen_transports`),
    then the bench's own `options`."""

    name: str
    help: str
    seconds: float | None = None
    seconds_help: str = "time per measurement"
    quick_help: str = "short runs (CI smoke test)"
    transport: bool = False
    options: tuple[Option, ...] = ()

    def add_parser(
        self, benches: Any, run: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        """Add `xenpv bench NAME` running `run`, with the options this bench lists."""
        parser: argparse.ArgumentParser = benches.add_parser(self.name, help=self.help)
        parser.add_argument("--quick", action="store_true", help=self.quick_help)
        parser.add_argument("--json", action="store_true", help="accepted; JSON is always last")
        if self.seconds is not None:
            parser.add_argument(
                "--seconds", type=types.positive_float, default=self.seconds, help=self.seconds_help
            )
        if self.transport:
            parser.add_argument(
                "--transport",
                choices=[*TRANSPORTS, "all"],
                default="all",
                help="domain link transport",
            )
        for opt in self.options:
            parser.add_argument(*opt.flags, **opt.kwargs)
        parser.set_defaults(run=run)
        return parser


def child_env() -> dict[str, str]:
    """This environment with this checkout first on PYTHONPATH: a `python -m xenpv` child runs
    the same code as the bench that starts it."""
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


async def spawn_reporting(
    sup: Supervisor, name: str, kind: str, command: Sequence[str], log_path: Path
) -> trio.Process:
    """Start a child on this checkout's code that reports to the bench on its stdout; its
    process (the caller kills and reaps it)."""
    child = await sup.spawn(name, kind, command, log_path, env=child_env(), stdout=subprocess.PIPE)
    assert isinstance(child.proc, trio.Process)  # spawned, not forked: it has a stdout
    return child.proc


def chosen_transports(args: argparse.Namespace) -> tuple[str, ...]:
    """The transports `--transport` asks for: one, or all of them."""
    return TRANSPORTS if args.transport == "all" else (args.transport,)


def run_supervised(
    measure: Callable[[Supervisor], Awaitable[T]],
) -> tuple[int, T | None]:
    """`trio.run` of `measure(sup)` under a supervisor, which records every process the
    measurement starts and stops them all on a Ctrl-C. Its exit code (0, or 130 after a
    Ctrl-C), and the result if the code is 0."""
    results: list[T] = []

    async def main(sup: Supervisor) -> int:
        results.append(await measure(sup))
        return 0

    code = supervisor.run(main, Supervisor())
    return code, (results[0] if code == 0 and results else None)
