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

EXAMPLE_TOML = """\
# A xenpv topology: the demo's (`xenpv demo`), with every setting spelled out.
# Run it with:   xenpv cluster up THIS_FILE [--detach]
# Check it with: xenpv topology check THIS_FILE
# One backend domain and three guests with 4 KiB, 16 KiB and 64 KiB pages, each with a
# vbd (a sparse image file) and a vif on the backend's switch.

# How domains share memory and notify each other:
# auto | shm (shared memory) | socket (copies over a Unix socket) | tcp (copies over TCP)
transport = "auto"

# The TCP listener xenstored opens for the domains (default: 127.0.0.1, a free port):
# [xenstore]
# tcp = "127.0.0.1:0"

# -- domains ---------------------------------------------------------------------------
# name: letters, digits, '-' and '_'; role: backend | guest (default guest);
# page_size: 4K | 16K | 64K (default 4K); memory: a multiple of the page size (default 64M;
# a 64 KiB-page guest spends one page per netfront receive slot: 256 slots = 16 MiB).

[[domain]]
name = "backend"
role = "backend"
page_size = "4K"
memory = "64M"

[[domain]]
name = "guest4k"
role = "guest"
page_size = "4K"
memory = "64M"

[[domain]]
name = "guest16k"
role = "guest"
page_size = "16K"
memory = "64M"

[[domain]]
name = "guest64k"
role = "guest"
page_size = "64K"
memory = "64M"

# -- block devices (blkif) ---------------------------------------------------------------
# image: relative to the state directory, created sparse if missing (omit it for a disk
# in memory); read_only = true needs an existing image. sector_size: 512 | 4096.
# [vbd.features] is what the backend offers; the frontend picks within it.

[[vbd]]
frontend = "guest4k"
backend = "backend"
image = "guest4k.img"
size = "16M"
read_only = false
sector_size = 512
[vbd.features]
ring_page_order = 4           # largest ring the backend accepts: 2^order pages, 0..4
queues = 4                    # multi-queue-max-queues, 1..4
indirect_segments = 256       # feature-max-indirect-segments, 0 = off
persistent = true             # persistent grants
flush = true                  # flush-cache
barrier = true                # write barriers
discard = true                # trim

[[vbd]]
frontend = "guest16k"
backend = "backend"
image = "guest16k.img"
size = "16M"

[[vbd]]
frontend = "guest64k"
backend = "backend"
image = "guest64k.img"
size = "16M"

# -- network devices (netif) -------------------------------------------------------------
# mac: unicast (default 00:16:3e:00:00:<n>); tap = "NAME" also attaches a host TAP device
# to the guest's netfront (root; see docs/net.md).

[[vif]]
frontend = "guest4k"
backend = "backend"
mac = "00:16:3e:00:00:01"

[[vif]]
frontend = "guest16k"
backend = "backend"
mac = "00:16:3e:00:00:02"

[[vif]]
frontend = "guest64k"
backend = "backend"
mac = "00:16:3e:00:00:03"
"""


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "topology", help="write an example topology file, check topology files"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
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
