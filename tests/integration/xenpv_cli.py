"""`xenpv ...` as a subprocess of this checkout, for the command-line tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from tests.integration.hv_pair import REPO

PREFIX = [sys.executable, "-m", "xenpv", "--log-level", "warning"]
ENV = dict(os.environ, PYTHONPATH=str(REPO))  # the subprocess imports this checkout's code


def xenpv(
    *args: str, timeout: float = 90, env: Mapping[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `xenpv ARGS` from the repository root and collect its output (any exit status).
    `env`: variables to set in the child's environment (None: to remove)."""
    child_env = dict(ENV)
    for name, value in (env or {}).items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    return subprocess.run(
        [*PREFIX, *args], capture_output=True, text=True, timeout=timeout, env=child_env, cwd=REPO
    )


def last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON object a `--json` command prints as its last stdout line."""
    value = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(value, dict), result.stdout
    return value


SMALL_VBD_FEATURES = """[vbd.features]
queues = 2
ring_page_order = 1
indirect_segments = 0
persistent = false
"""


def small_topology(transport: str = "auto", restart: str = "no", vbd_features: str = "") -> str:
    """The command-line tests' cluster: backend `be`, 16K guest `g16` (its `restart` policy)
    with a 4M vbd on disk.img (`vbd_features`: a [vbd.features] table) and a vif."""
    return f"""
transport = "{transport}"

[[domain]]
name = "be"
role = "backend"

[[domain]]
name = "g16"
page_size = "16K"
restart = "{restart}"

[[vbd]]
frontend = "g16"
backend = "be"
image = "disk.img"
size = "4M"
{vbd_features}
[[vif]]
frontend = "g16"
backend = "be"
"""
