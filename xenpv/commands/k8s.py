"""`xenpv k8s render`: Kubernetes manifests for a topology (docs/k8s.md).

    xenpv k8s render [TOPOLOGY] [-o DIR] [--image IMAGE] [--storage-class NAME]

Without `-o` the manifests go to stdout as one multi-document YAML stream (for
`kubectl apply -f -`); with `-o DIR` one file per component plus `kustomization.yaml`, a
Kustomize base (`kubectl apply -k DIR`). TOPOLOGY defaults to the demo topology.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from xenpv.commands import args as types
from xenpv.errors import UsageError
from xenpv.k8s import render, yamlout
from xenpv.toolstack import topology


def register(sub: Any) -> None:
    actions = types.add_actions(sub, "k8s", help="Kubernetes: render manifests for a topology")
    run = actions.add_parser("render", help="write a Kustomize base for a topology")
    run.add_argument(
        "file", type=Path, nargs="?", default=None, help="topology (default: the demo's)"
    )
    run.add_argument("-o", "--output", type=Path, default=None, help="directory (default: stdout)")
    run.add_argument("--image", default=render.DEFAULT_IMAGE, help="the xenpv image")
    run.add_argument("--storage-class", default=None, help="for every volume claim")
    run.set_defaults(run=run_render)


def run_render(args: argparse.Namespace) -> int:
    if args.file is None:
        text = topology.DEFAULT_TOPOLOGY_TOML
    else:
        try:
            text = args.file.read_text()
        except OSError as exc:
            raise UsageError(f"{args.file}: cannot read: {exc.strerror}") from None
    topo = topology.loads(text, str(args.file or "<default topology>"))
    files = render.render(
        topo, text, render.Options(image=args.image, storage_class=args.storage_class)
    )
    if args.output is None:
        sys.stdout.write(yamlout.dump_all(d for f in files[:-1] for d in f.documents))
        return 0
    out: Path = args.output
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / f.name).write_text(yamlout.dump_all(f.documents))
    except OSError as exc:
        raise UsageError(f"{out}: cannot write: {exc.strerror}") from None
    print(f"xenpv: wrote {len(files)} files to {out} (kubectl apply -k {out})", file=sys.stderr)
    return 0
