"""docker-compose.yml on a real container engine (marker `engine`; docs/compose.md).

Builds the image (the base image from tests/engine/base-image.sh: pulled, or a local stand-in
where no registry is reachable) and runs the cluster as a user would, under a project name of
its own: `up -d` then `wait check` (its JSON verdict: every check passed, three page sizes),
`run --rm check` again (Compose re-runs the one-shot toolstack: `apply` is idempotent), the
backend's process killed and brought back by its restart policy, healthy, with the guests
reconnected (another passing check round), a second `up`, then `down -v` and nothing of the
project left: containers, networks, volumes. The `chaos` profile runs the smoke fault plan
against the compose domains and passes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = f"xenpv-engine-test-{os.getpid()}"
GUESTS = ("guest4k", "guest16k", "guest64k")
PAGE_SIZES = {4096, 16384, 65536}
# Compose's healthchecks run every 2 s with up to 30 retries (docker-compose.yml).
RECOVERY_S = 120.0

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def compose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run("docker", "compose", "-p", PROJECT, "-f", "docker-compose.yml", *args,
               timeout=timeout)  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


def verdicts(output: str) -> list[dict[str, Any]]:
    """The check's JSON summaries in `output`: stdout lines that are JSON objects with `checks`."""
    found: list[dict[str, Any]] = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and '"checks"' in line:
            found.append(json.loads(line))
    return found


def verdict(output: str) -> dict[str, Any]:
    """The check's last JSON summary in `output`."""
    found = verdicts(output)
    if not found:
        raise AssertionError(f"no JSON verdict in {output[-2000:]!r}")
    return found[-1]


def assert_passed(summary: dict[str, Any]) -> None:
    failed = [c for c in summary["checks"] if c.get("ok") is not True]
    assert summary["ok"] is True and not failed, failed
    assert {g["page_size"] for g in summary["guests"]} == PAGE_SIZES
    # one block check per guest, one echo per ordered pair, completeness, connectivity
    assert len(summary["checks"]) == len(GUESTS) + len(GUESTS) * (len(GUESTS) - 1) + 2


def container_of(service: str) -> str:
    ids = ok(compose("ps", "-q", service)).split()
    assert len(ids) == 1, ids
    return ids[0]


def inspect(container: str, template: str) -> str:
    return ok(run("docker", "inspect", "-f", template, container)).strip()


def await_healthy(container: str, *, restarts: int) -> None:
    """Poll docker (bounded) until `container` restarted `restarts` times and is healthy."""
    deadline = time.monotonic() + RECOVERY_S
    state = ""
    while time.monotonic() < deadline:
        state = inspect(container, "{{.RestartCount}} {{.State.Status}} {{.State.Health.Status}}")
        count, status, health = state.split()
        if int(count) >= restarts and status == "running" and health == "healthy":
            return
        time.sleep(1)  # polling an external engine; the deadline bounds it
    raise AssertionError(f"{container[:12]}: not healthy after {RECOVERY_S:.0f} s ({state})")


def project_leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": ok(run("docker", "ps", "-aq", "--filter", label)).split(),
        "networks": ok(run("docker", "network", "ls", "-q", "--filter", label)).split(),
        "volumes": ok(run("docker", "volume", "ls", "-q", "--filter", label)).split(),
    }


@pytest.fixture(scope="module")
def image() -> None:
    ok(run("bash", str(ROOT / "tests" / "engine" / "base-image.sh"), timeout=900))
    ok(compose("build", "--quiet", "xenstored", timeout=900))


@pytest.fixture
def cluster(image: None) -> Iterator[None]:
    try:
        yield
    finally:
        down = compose("down", "-v", "--remove-orphans", "--timeout", "20")
        assert down.returncode == 0, down.stderr
        assert project_leftovers() == {"containers": [], "networks": [], "volumes": []}


def test_compose_cluster_on_a_real_engine(cluster: None) -> None:
    # The documented one-liner: start detached, then `wait` gives check's exit status.
    ok(compose("up", "-d", "--no-build"))
    waited = compose("wait", "check")
    assert waited.returncode == 0, (waited.stdout, waited.stderr)
    assert waited.stdout.strip().endswith("0")
    assert_passed(verdict(ok(compose("logs", "--no-log-prefix", "check"))))
    toolstack = ok(compose("logs", "--no-log-prefix", "toolstack"))
    assert "xenpv: created backend" in toolstack

    # Again, any time: Compose re-runs the toolstack as a dependency; it changes nothing.
    assert_passed(verdict(ok(compose("run", "--rm", "check"))))
    assert "unchanged" in ok(compose("logs", "--no-log-prefix", "toolstack"))

    # The backend crashes (its process killed, not stopped): the restart policy brings it
    # back, it becomes healthy, the guests reconnect and a check round passes again.
    backend = container_of("backend")
    os.kill(int(inspect(backend, "{{.State.Pid}}")), signal.SIGKILL)
    await_healthy(backend, restarts=1)
    for guest in GUESTS:
        await_healthy(container_of(guest), restarts=0)
    assert_passed(verdict(ok(compose("run", "--rm", "check"))))

    # A second `up` against the live cluster (after the crash): everything is up to date,
    # the one-shot jobs run again and pass.
    ok(compose("up", "-d", "--no-build"))
    assert compose("wait", "check").stdout.strip().endswith("0")
    # The check container ran twice now. Its stdout (the verdict) and stderr (the tables)
    # reach the engine's log through two pipes, so their lines may interleave either way:
    # count verdicts rather than take the last few lines.
    runs = verdicts(ok(compose("logs", "--no-log-prefix", "check")))
    assert len(runs) == 2, runs
    assert_passed(runs[-1])


def test_chaos_profile_runs_a_plan_against_the_compose_domains(cluster: None) -> None:
    """`docker compose --profile chaos run --rm chaos`: the smoke plan against the domains of
    the compose services (an attached run: faults through xenstore, histories through the
    shared `faults` volume), after which the cluster still passes a check round."""
    ok(compose("up", "-d", "--no-build"))
    assert compose("wait", "check").stdout.strip().endswith("0")
    chaos = compose("--profile", "chaos", "run", "--rm", "chaos", timeout=600)
    assert chaos.returncode == 0, (chaos.stdout[-3000:], chaos.stderr[-3000:])
    result = json.loads(chaos.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["plan"] == "smoke"
    assert result["faults_injected"] == result["faults_scheduled"] >= 8
    assert result["history"] == "/var/lib/xenpv/faults/history.jsonl"
    assert_passed(verdict(ok(compose("run", "--rm", "check"))))
