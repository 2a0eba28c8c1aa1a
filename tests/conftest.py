"""Test-wide fixtures and the machine-requirement policy.

Tests that need something from the machine carry a marker:
- `tools`: Debian's xenstore-utils (xenstore-read, ...);
- `headers`: gcc and the Xen public headers from libxen-dev;
- `root`: root privileges plus iproute2 (network namespaces, TAP);
- `engine`: a running container engine and Docker Compose v2.20+ (`docker compose wait`).
Without the requirement they skip with a reason; with XENPV_REQUIRE_SYSTEM=1 (CI) they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings

from xenpv import log

# The machines that run this suite have 2 cores shared with everything else: example timing
# is not a property of the code under test.
settings.register_profile("xenpv", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("xenpv")

REQUIRE_SYSTEM = os.environ.get("XENPV_REQUIRE_SYSTEM") == "1"

XENSTORE_TOOLS = (
    "xenstore-read",
    "xenstore-write",
    "xenstore-ls",
    "xenstore-list",
    "xenstore-rm",
    "xenstore-chmod",
    "xenstore-exists",
    "xenstore-watch",
)
XEN_HEADERS = Path("/usr/include/xen/io")


def _missing_tools() -> list[str]:
    return [tool for tool in XENSTORE_TOOLS if shutil.which(tool) is None]


def _missing_headers() -> list[str]:
    missing = [] if shutil.which("gcc") else ["gcc"]
    for header in ("ring.h", "blkif.h", "netif.h", "xs_wire.h"):
        if not (XEN_HEADERS / header).exists():
            missing.append(str(XEN_HEADERS / header))
    return missing


def _missing_root() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root privileges"]
    if shutil.which("ip") is None:
        missing.append("ip (iproute2)")
    return missing


COMPOSE_MIN = (2, 20)


def _missing_engine() -> list[str]:
    if shutil.which("docker") is None:
        return ["docker CLI"]
    probes = {
        "a running docker daemon": ["docker", "info", "--format", "{{.ServerVersion}}"],
        "Docker Compose v2": ["docker", "compose", "version", "--short"],
    }
    out: dict[str, str] = {}
    for what, command in probes.items():
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return [what]
        if done.returncode != 0:
            return [what]
        out[what] = done.stdout.strip()
    match = re.match(r"v?(\d+)\.(\d+)", out["Docker Compose v2"])
    if match is None or (int(match[1]), int(match[2])) < COMPOSE_MIN:
        return [
            f"Docker Compose >= {COMPOSE_MIN[0]}.{COMPOSE_MIN[1]} (have {out['Docker Compose v2']})"
        ]
    return []


_REQUIREMENTS = {
    "tools": (_missing_tools, "apt-get install xenstore-utils"),
    "headers": (_missing_headers, "apt-get install gcc libxen-dev"),
    "root": (_missing_root, "run as root with iproute2 installed"),
    "engine": (_missing_engine, "see README: docker.io, dockerd running, a Compose v2 CLI plugin"),
}


def require(marker: str) -> None:
    """Skip (or, under XENPV_REQUIRE_SYSTEM=1, fail) unless the marker's requirement is met."""
    check, hint = _REQUIREMENTS[marker]
    missing = check()
    if missing:
        skip_or_fail(marker, missing, hint)


def skip_or_fail(marker: str, missing: list[str], hint: str) -> NoReturn:
    """Skip the test, or fail it under XENPV_REQUIRE_SYSTEM=1: `missing` things (of the
    `marker` kind) are not on this machine; `hint` says how to get them."""
    reason = f"[{marker}] missing {', '.join(missing)} ({hint})"
    if REQUIRE_SYSTEM:
        pytest.fail(f"{reason}; XENPV_REQUIRE_SYSTEM=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    log.configure("warning", json=True)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in _REQUIREMENTS:
        if item.get_closest_marker(marker) is not None:
            require(marker)
