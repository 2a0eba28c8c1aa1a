"""`xenpv faults run PLAN --json` as a subprocess, for the end-to-end fault-run tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_faults(
    plan: str, state: Path, history: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the plan (a catalogue name or a file) with its state in `state` and its merged
    history at `history`; the result whatever the exit status."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "xenpv", "faults", "run", plan, "--json"),
            *("--state-dir", str(state), "--history", str(history)),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
        check=False,
    )


def run_verdict(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run's JSON verdict: its last stdout line."""
    value = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(value, dict)
    return value
