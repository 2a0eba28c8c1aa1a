"""`xenpv bench NAME`: run one benchmark from the `benchmarks` package.

Each benchmark module exposes `BENCH` (its name and options, a `xenpv.bench.cli.Bench`) and
`run(args)`; it prints a table on stderr and one JSON object as the last line of stdout (see
`xenpv.bench.report`).
"""

from __future__ import annotations

import importlib
from typing import Any

from xenpv.commands import args as types

BENCH_MODULES: tuple[str, ...] = (
    "xenpv.bench.xenstore",
    "xenpv.bench.ring",
    "xenpv.bench.link",
    "xenpv.bench.storage",
    "xenpv.bench.blk",
    "xenpv.bench.net",
    "xenpv.bench.net_granule",
    "xenpv.bench.scale",
)


def register(sub: Any) -> None:
    benches = types.add_actions(
        sub,
        "bench",
        help="run a benchmark (table on stderr, JSON on the last line of stdout)",
        dest="bench",
        metavar="BENCH",
    )
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # not written yet
        module.BENCH.add_parser(benches, module.run)
