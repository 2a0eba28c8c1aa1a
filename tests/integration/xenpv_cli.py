"""`xenpv ...` as a subprocess of this checkout, for the command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.integration.hv_pair import REPO

PREFIX = [sys.executable, "-m", "xenpv", "--log-level", "warning"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))  # the subprocess imports this checkout's code


def xenpv(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run `xenpv ARGS` from the repository root and collect its output (any exit status)."""
    return subprocess.run(
        [*PREFIX, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO
    )
