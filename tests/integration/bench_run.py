"""Runs a `xenpv bench` command the way the bench smoke tests do: `--quick --json`, in a child
running this checkout; what they check is the shape of its result, never its speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_quick_bench(name: str, *options: str) -> tuple[dict[str, Any], str]:
    """`xenpv bench NAME --quick --json OPTIONS`: the JSON object its stdout ends with, and its
    stderr (the human table). Fails the test, with stderr's tail, if the bench fails."""
    bench = ["bench", name, "--quick", "--json", *options]
    result = subprocess.run(
        [sys.executable, "-m", "xenpv", "--log-level", "warning", *bench],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data, result.stderr
