"""`xenpv topology example|check`: start a topology file, and check one.

    xenpv topology example [-o FILE] [--force]
    xenpv topology check FILE...

`example` writes the demo's topology (`xenpv demo`) as a TOML file with every setting
commented, to edit and run with `xenpv cluster up FILE`; without `-o` it goes to stdout.
`check` parses and validates files (`xenpv.toolstack.topology`) and prints one summary
line each; the first invalid one is a one-line error (exit 1) naming the field.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from xenpv.commands import args as types
from xenpv.errors import UsageError
from xenpv.toolstack import topology

# The demo's topology, every setting commented: the file `example` writes.
EXAMPLE_TOML = topology.DEFAULT_TOPOLOGY_TOML


def register(sub: Any) -> None:
    actions = types.add_actions(
        sub, "topology", help="write an example topology file, check topology files"
    )
    example = actions.add_parser("example", help="the demo's topology as a commented TOML file")
    example.add_argument(
        "-o",
        "--output",
        type=types.output_file,
        default=None,
        metavar="FILE",
        help="write it here (default: stdout)",
    )
    example.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    example.set_defaults(run=run_example)
    check = actions.add_parser("check", help="parse and validate topology files")
    check.add_argument("files", nargs="+", type=types.existing_file, metavar="FILE")
    check.set_defaults(run=run_check)


def run_example(args: argparse.Namespace) -> int:
    if args.output is None:
        sys.stdout.write(EXAMPLE_TOML)
        return 0
    if args.output.exists() and not args.force:
        raise UsageError(f"{args.output} exists; --force overwrites it")
    args.output.write_text(EXAMPLE_TOML)
    print(
        f"xenpv: wrote {args.output}; run it with: xenpv cluster up {args.output}",
        file=sys.stderr,
    )
    return 0


def summary(topo: topology.Topology) -> str:
    """`4 domains (1 backend, 3 guests: 1x4K 1x16K 1x64K), 3 vbds, 3 vifs, transport auto`."""
    sizes = sorted({d.page_size for d in topo.guests})
    counts = [sum(1 for d in topo.guests if d.page_size == size) for size in sizes]
    pages = " ".join(f"{n}x{size >> 10}K" for size, n in zip(sizes, counts, strict=True))
    taps = sum(1 for v in topo.vifs if v.tap)
    return (
        f"{len(topo.domains)} domains ({len(topo.backends)} backend"
        f"{'s' if len(topo.backends) != 1 else ''}, {len(topo.guests)} guests: {pages}), "
        f"{len(topo.vbds)} vbds, {len(topo.vifs)} vifs"
        + (f" ({taps} with a TAP)" if taps else "")
        + f", transport {topo.transport}"
    )


def run_check(args: argparse.Namespace) -> int:
    for path in args.files:
        print(f"{path}: ok, {summary(topology.load(path))}")
    return 0
