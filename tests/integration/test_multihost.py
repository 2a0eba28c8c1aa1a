"""docker-compose.yml run across "hosts": each service in its own network namespace.

No docker engine here, so the test plays compose's part from the file itself: every service's
`command`, `healthcheck`, `depends_on` conditions and volumes come from docker-compose.yml
(`xenpv` → this interpreter's `python -m xenpv`; a named volume → a shared temporary
directory; the container's private /tmp → a per-service directory). Each service runs in its
own namespace (`tests/integration/netns.py`): a bridge joins them, and each reaches the others
by service name, over TCP only, as containers on a compose network do.

Healthchecks are run as docker runs them: the test command, retried every `interval` up to
`retries` times after `start_period`; `service_completed_successfully` waits for exit 0.
The one-shot `check` service then runs a self-test round in every guest (verified block I/O,
a verified echo between every pair of guests over the vifs) and must report every check
passed with 4 KiB, 16 KiB and 64 KiB guests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.integration.netns import NetnsLab

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
LOG_TAIL = 2000


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def depends(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def start_order(services: dict[str, Any]) -> list[str]:
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in order:
            for dep in depends(services[name]):
                visit(dep)
            order.append(name)

    for name in services:
        visit(name)
    return order


def seconds(text: str | None, default: float) -> float:
    """Compose durations (`2s`, `1m30s`, `500ms`)."""
    if text is None:
        return default
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text)):
        total += float(number) * units[unit]
    return total


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    mounts: dict[str, Path]  # container path → host directory
    log: Path
    proc: trio.Process | None = None
    started: trio.Event = field(default_factory=trio.Event)
    healthy: trio.Event = field(default_factory=trio.Event)
    completed: trio.Event = field(default_factory=trio.Event)
    stdout: bytes = b""

    def translate(self, argv: list[str]) -> list[str]:
        """The container's argv run here: `xenpv` is this interpreter's; paths stay as
        written (the volumes are bind-mounted at their container paths)."""
        return [sys.executable, "-m", "xenpv", *argv[1:]] if argv[0] == "xenpv" else argv

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""


class ComposeRun:
    """Runs the services of a compose file, one namespace each, honouring depends_on."""

    def __init__(self, doc: dict[str, Any], lab: NetnsLab, workdir: Path) -> None:
        self.doc = doc
        self.lab = lab
        self.services: dict[str, Service] = {}
        for name, spec in doc["services"].items():
            if spec.get("profiles"):
                continue  # as `docker compose up`: a profile's services only when asked
            mounts: dict[str, Path] = {"/tmp": workdir / "private" / name}
            for entry in spec.get("volumes", []):
                source, _, rest = str(entry).partition(":")
                target = rest.split(":")[0]
                mounts[target] = workdir / "volumes" / source
            for host in mounts.values():
                host.mkdir(parents=True, exist_ok=True)
            self.services[name] = Service(name, spec, mounts, workdir / f"{name}.log")

    def argv(self, name: str, argv: list[str]) -> list[str]:
        svc = self.services[name]
        return self.lab.exec_argv(name, svc.translate(argv), svc.mounts)

    async def _wait_for(self, name: str) -> None:
        for dep, condition in depends(self.services[name].spec).items():
            target = self.services[dep]
            if condition == "service_healthy":
                await target.healthy.wait()
            elif condition == "service_completed_successfully":
                await target.completed.wait()
            else:
                await target.started.wait()

    async def _healthcheck(self, svc: Service) -> None:
        check = svc.spec.get("healthcheck")
        if check is None:
            return
        test = check["test"]
        assert test[0] == "CMD", "the compose file uses the exec form"
        argv = self.argv(svc.name, test[1:])
        interval = seconds(check.get("interval"), 30)
        grace_until = trio.current_time() + seconds(check.get("start_period"), 0)
        retries = int(check.get("retries", 3))
        failures, last = 0, ""
        while failures < retries:
            # docker's healthcheck: the test command every `interval`; failures count once
            # `start_period` is over
            await trio.sleep(interval)
            with trio.move_on_after(seconds(check.get("timeout"), 30)):
                result = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False
                )
                if result.returncode == 0:
                    svc.healthy.set()
                    return
                last = (result.stderr or result.stdout).decode(errors="replace").strip()
            if trio.current_time() > grace_until:
                failures += 1
        raise AssertionError(f"{svc.name} never became healthy: {last}\n{self.tails()}")

    def tails(self) -> str:
        return "\n".join(f"--- {s.name}:\n{s.tail()[-800:]}" for s in self.services.values())

    async def _run(self, svc: Service) -> None:
        await self._wait_for(svc.name)
        argv = self.argv(svc.name, [str(a) for a in svc.spec["command"]])
        one_shot = svc.spec.get("restart") == "no"
        with svc.log.open("ab") as logf:
            if one_shot:
                result = await trio.run_process(argv, capture_stdout=True, stderr=logf, check=False)
                svc.stdout = result.stdout or b""
                svc.started.set()
                assert result.returncode == 0, (
                    f"one-shot {svc.name} exited {result.returncode}:\n{svc.tail()}"
                )
                svc.completed.set()
                return
            svc.proc = await trio.lowlevel.open_process(argv, stdout=logf, stderr=logf)
        svc.started.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._healthcheck, svc)
            code = await svc.proc.wait()
            if not self.stopping:
                raise AssertionError(f"{svc.name} exited with {code}:\n{svc.tail()}")
            nursery.cancel_scope.cancel()

    stopping = False

    @asynccontextmanager
    async def up(self) -> AsyncIterator[ComposeRun]:
        try:
            async with trio.open_nursery() as nursery:
                for name in start_order(self.services_spec()):
                    nursery.start_soon(self._run, self.services[name])
                yield self
                await self.down()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.down()

    def services_spec(self) -> dict[str, Any]:
        return {n: s.spec for n, s in self.services.items()}

    async def down(self) -> None:
        """SIGTERM by dependency level, dependents first (guests, then the backend, then
        xenstored), the services of one level together, as compose stops containers."""
        self.stopping = True
        specs = self.services_spec()
        level: dict[str, int] = {}
        for name in start_order(specs):
            level[name] = 1 + max((level[d] for d in depends(specs[name])), default=0)
        for depth in sorted(set(level.values()), reverse=True):
            async with trio.open_nursery() as nursery:
                for name in (n for n, d in level.items() if d == depth):
                    nursery.start_soon(self._stop, self.services[name])

    async def _stop(self, svc: Service) -> None:
        proc = svc.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(seconds(svc.spec.get("stop_grace_period"), 10)):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
def workdir() -> Any:
    path = Path(tempfile.mkdtemp(prefix="xpv-mh-", dir="/tmp"))
    yield path
    if not os.environ.get("XENPV_KEEP_WORKDIR"):
        shutil.rmtree(path, ignore_errors=True)


async def test_xenstored_reached_by_name_from_another_namespace_only(workdir: Path) -> None:
    """The harness: xenstored (its compose command) in one namespace answers a probe from
    another namespace by host name, and its TCP port is not reachable as localhost there."""
    doc = {"services": {"xenstored": load_compose()["services"]["xenstored"]}}
    with NetnsLab(["xenstored", "client"]) as lab:
        run = ComposeRun(doc, lab, workdir)
        svc = run.services["xenstored"]
        port = next(a for a in svc.spec["command"] if a.startswith("--tcp=")).rpartition(":")[2]
        with trio.fail_after(60):
            async with run.up():
                await svc.healthy.wait()
                probe = [sys.executable, "-m", "xenpv", "probe", "xenstored"]
                remote = await trio.run_process(
                    lab.exec_argv("client", [*probe, f"--xenstore=tcp:xenstored:{port}"]),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert remote.returncode == 0, remote.stderr
                assert b"authentication hello" in remote.stdout
                local = await trio.run_process(
                    lab.exec_argv("client", [*probe, f"--xenstore=tcp:127.0.0.1:{port}"]),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert local.returncode == 1
                assert b"xenstored at tcp:127.0.0.1" in local.stderr


@pytest.mark.timeout(300)
async def test_compose_cluster_across_network_namespaces(workdir: Path) -> None:
    doc = load_compose()
    with NetnsLab(list(doc["services"])) as lab:
        run = ComposeRun(doc, lab, workdir)
        with trio.fail_after(240):
            async with run.up():
                await run.services["check"].completed.wait()
                # after the round, dom0 still sees every domain ready with its devices Connected
                for name in ("backend", "guest4k"):
                    probe = [
                        "xenpv",
                        "probe",
                        "domain",
                        name,
                        "--xenstore=unix:/run/xenpv/xenstored.sock",
                        "--connected",
                    ]
                    result = await trio.run_process(
                        run.argv("check", probe), capture_stdout=True, check=False
                    )
                    assert result.returncode == 0
    summary = json.loads(run.services["check"].stdout.decode().strip().splitlines()[-1])
    assert summary["ok"] is True, summary
    assert sorted(g["page_size"] for g in summary["guests"]) == [4096, 16384, 65536]
    checks = {c["name"]: c for c in summary["checks"]}
    block = [c for n, c in checks.items() if n.startswith("block-")]
    net = [c for n, c in checks.items() if n.startswith("net-")]
    assert len(block) == 3 and all(c["ok"] for c in block)
    assert len(net) == 6 and all(c["ok"] and c["frames"] > 0 for c in net)
    assert checks["devices-connected"]["ok"] and checks["selftest-complete"]["ok"]
