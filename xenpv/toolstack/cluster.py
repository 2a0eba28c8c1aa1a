"""The local launcher: a topology → xenstored + one `xenpv domain` process per domain.

    async with launch(topology, state_dir) as cluster:     # every device Connected here
        status = await read_status(cluster.xs)
    # leaving the block stops every process it started (guests first, see supervisor.stop)

What `launch` does, as the toolstack (dom0):
1. takes the state directory's lock (`supervisor.lock_state_dir`): a directory a live cluster
   uses is refused with one line, a stale lock is taken over;
2. starts `xenpv xenstored` with its Unix socket in the state directory and a TCP listener
   (the topology's `[xenstore] tcp`, default 127.0.0.1:0) for the domains, and waits for its
   `--ready-fd` line;
3. creates every domain (`toolstack.create_domain`), writing its key file (0600) in
   `keys/`; the link endpoint is a Unix socket in `links/` (transport auto/shm/socket) or a
   free TCP port on 127.0.0.1 (transport tcp, the socket-copy path over TCP);
4. writes every device (`provision.plan_devices`); relative image paths are under the state
   dir;
5. starts one `xenpv domain` process per domain (logs in `logs/<name>.log`);
6. waits, with watches, until every domain wrote `xenpv/ready` and every device is Connected
   on both ends. It fails at once, naming the device and the reason, when an end gives a
   device up (Linux's `xenbus_dev_fatal`: an `error` node, the backend Closing or Closed),
   or a domain process exits (with the end of its log); a timeout names each stuck device.
Every process is spawned through a `Supervisor`, which records it in `cluster.json` at once
(written from the start: `cluster status` and `down` work for a foreground cluster too).

While the block runs, a domain process that dies is handled by its restart policy
(`restart = "on-failure"` in the topology: a non-zero status or a signal re-creates the
domain in xenstore, with the same domid and devices, and starts its process again), else by
`on_exit`: "fail" (the foreground: the block is cancelled with a ClusterError naming it) or
"record" (the detached supervisor: the domain is destroyed in xenstore as the toolstack does,
so its backends close its devices, and recorded as dead with its exit status in `cluster.json`
and in xenstore under DEAD_ROOT, which `cluster status` and `probe domain` read).

xenstored can be killed and restarted while the block runs (`kill_xenstored`, then
`restart_xenstored`; a fault run's `xenstore.xenstored-kill`): the new process opens the same
data directory (its snapshot and journal: every acknowledged write is there), listens on the
same Unix socket and TCP address, and every client reconnects and re-registers its watches
(xenpv/xenstore/client.py). Between the two, xenstored's exit is expected, not a failure.

Detached (`xenpv cluster up --detach`), the foreground command starts a supervisor process
(`xenpv cluster up --ready-fd N`, its own session) which runs `launch` with "record" and
writes READY once the cluster is; `down` sends it SIGTERM and it tears everything down.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.toolstack import devices, logs, provision
from xenpv.toolstack import domains as toolstack
from xenpv.toolstack.progress import NO_PROGRESS, Progress
from xenpv.toolstack.quotas import plan_quotas
from xenpv.toolstack.supervisor import (
    SUPERVISOR,
    Child,
    Supervisor,
    alive,
    describe_status,
    lock_holder,
    lock_state_dir,
    unlock_state_dir,
    wait_exit,
)
from xenpv.toolstack.topology import DomainSpec, Topology, TopologyError
from xenpv.xenbus.core import Closed, Closing, DeviceId, parse_state
from xenpv.xenstore.client import XenstoreClient, connect
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

STATE_FILE = "cluster.json"
XENSTORED_READY_TIMEOUT = 20.0
DEFAULT_TIMEOUT = 60.0
DOMAIN_TRANSPORT = {"auto": "auto", "shm": "shm", "socket": "socket", "tcp": "socket"}
DEAD_ROOT = "/tool/xenpv/dead"  # <name> = JSON {domid, pid, status, reason} of a dead domain
MAX_RESTARTS = 5  # per domain: a process that keeps dying is recorded dead after that
SUPERVISOR_LOG = "supervisor.log"
RESYNC_S = 5.0  # start-up re-checks what is still pending this often (lost events)
DOWN_TIMEOUT = 60.0  # how long `down` waits for a supervisor to stop its cluster

OnExit = Literal["fail", "record"]


class ClusterError(XenpvError):
    """The cluster cannot be started, reached or stopped as asked."""


@dataclass(slots=True)
class Cluster:
    topology: Topology
    state_dir: Path
    xs: XenstoreClient
    xenstore_unix: str
    xenstore_tcp: str
    sup: Supervisor
    domids: dict[str, int] = field(default_factory=dict)
    devices: list[DeviceId] = field(default_factory=list)
    dead: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    forkserver: Path | None = None  # its socket: domain processes are forked from it
    # Told `(name, "down")` when a domain's process exits and `(name, "up")` when the restart
    # policy started it again (a fault run records both in its history).
    on_domain: Callable[[str, str], None] | None = None
    # How xenstored was started (without its ready fd), to start it again in place.
    xenstored_args: list[str] = field(default_factory=list)
    # Set while xenstored is down on purpose; set (the event) once it is back or not coming.
    xenstored_restart: trio.Event | None = None

    def domain_event(self, name: str, event: str) -> None:
        if self.on_domain is not None:
            self.on_domain(name, event)

    @property
    def children(self) -> list[Child]:
        return self.sup.children

    def name_of(self, domid: int) -> str:
        for name, d in self.domids.items():
            if d == domid:
                return name
        return str(domid)

    async def spawn_guest(self, name: str, args: Sequence[str], domid: int) -> Child:
        """Start a process that uses devices (a worker, ...): stopped with the guests."""
        return await self.sup.spawn(
            name, "guest", args, self.state_dir / "logs" / f"{name}.log", domid=domid
        )

    def describe(self) -> dict[str, Any]:
        """What `cluster.json` holds besides the processes (see Supervisor.state)."""
        return {
            "xenstore": {"unix": self.xenstore_unix, "tcp": self.xenstore_tcp},
            "domains": self.domids,
            "devices": [
                {
                    "cls": d.cls,
                    "frontend": d.frontend_domid,
                    "backend": d.backend_domid,
                    "devid": d.devid,
                }
                for d in self.devices
            ],
            "dead": self.dead,
            "restarts": self.restarts,
        }


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _python() -> list[str]:
    return [sys.executable, "-m", "xenpv"]


def _log_options(log_level: str) -> list[str]:
    """The global options of every child the cluster starts: JSON log lines at the cluster's
    level."""
    return ["--log-level", log_level, "--log-format", "json"]


_alive = alive  # the name tests and older callers use


def read_state(state_dir: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{state_dir / STATE_FILE}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise ClusterError(f"{state_dir / STATE_FILE}: not a cluster state file")
    return value


def _busy(state_dir: Path) -> Any:
    def message(holder: int | None) -> str:
        who = f" (supervisor pid {holder})" if holder else ""
        return (
            f"a cluster is already running in {state_dir}{who}; "
            f"stop it with: xenpv cluster down --state-dir {state_dir}"
        )

    return message


def check_free(state_dir: Path) -> None:
    """Refuse a state directory a live cluster owns (its supervisor holds the lock)."""
    holder = lock_holder(state_dir)
    if holder is not None:
        raise ClusterError(_busy(state_dir)(holder))


def _check_no_stale_processes(state_dir: Path) -> None:
    """Nobody holds the lock; processes an earlier supervisor left (it was SIGKILLed) would
    still use the sockets: refuse until `down` stopped them."""
    state = read_state(state_dir)
    if state is None:
        return
    live = [p["name"] for p in state.get("processes", []) if alive(int(p.get("pid", 0)))]
    if live:
        raise ClusterError(
            f"a cluster is already running in {state_dir} ({', '.join(live)}, left by a "
            f"supervisor that died); stop it with: xenpv cluster down --state-dir {state_dir}"
        )
    (state_dir / STATE_FILE).unlink(missing_ok=True)


async def _start_xenstored(
    sup: Supervisor, state_dir: Path, tcp: str, log_level: str, quota_args: Sequence[str] = ()
) -> tuple[Child, str, str, list[str]]:
    """Start xenstored on an empty store: (child, unix address, tcp address, its arguments
    with the bound TCP address, for a restart)."""
    sock = state_dir / "xenstored.sock"
    sock.unlink(missing_ok=True)
    data = state_dir / "xenstore"
    shutil.rmtree(data, ignore_errors=True)  # a new cluster starts from an empty store
    args = [
        *_python(),
        *_log_options(log_level),
        "xenstored",
        "--socket",
        str(sock),
        "--data-dir",
        str(data),
        *quota_args,
        "--tcp",
        tcp,
    ]
    child, unix, tcp_addr = await _spawn_xenstored(sup, state_dir, args)
    if tcp_addr:
        args[-1] = tcp_addr.removeprefix("tcp:")  # a restart listens where clients look
    return child, unix, tcp_addr, args


async def _spawn_xenstored(
    sup: Supervisor, state_dir: Path, args: list[str]
) -> tuple[Child, str, str]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    log_path = state_dir / "logs" / "xenstored.log"
    child, line = await _spawn_until_ready(
        sup, "xenstored", [*args, "--ready-fd", str(write_fd)], log_path, read_fd, write_fd
    )
    words = line.decode(errors="replace").split()
    if not words or words[0] != "READY":
        raise ClusterError(f"xenstored did not start: {logs.failure_summary(child.tail())}")
    unix = next(w for w in words if w.startswith("unix:"))
    tcp_addr = next((w for w in words if w.startswith("tcp:")), "")
    return child, unix, tcp_addr


def _xenstored(cluster: Cluster) -> Child | None:
    return next((c for c in cluster.children if c.kind == "xenstored"), None)


def expect_xenstored_exit(cluster: Cluster) -> None:
    """xenstored is about to be killed on purpose: its exit does not end the cluster, whose
    death watcher waits for `restart_xenstored` instead."""
    if cluster.xenstored_restart is None:
        cluster.xenstored_restart = trio.Event()


async def kill_xenstored(cluster: Cluster, sig: int = signal.SIGKILL) -> None:
    """Kill xenstored (kill -9 by default) and wait for it to exit; `restart_xenstored`
    brings it back. Its clients keep reconnecting meanwhile (for their reconnect timeout)."""
    child = _xenstored(cluster)
    if child is None or not child.running:
        raise ClusterError("xenstored is not running")
    expect_xenstored_exit(cluster)
    log.warning("killing xenstored", pid=child.pid, signal=signal.Signals(sig).name)
    os.kill(child.pid, sig)
    await wait_exit(child)


async def restart_xenstored(cluster: Cluster) -> Child:
    """Start xenstored again on the same data directory, socket and TCP address."""
    old = _xenstored(cluster)
    event = cluster.xenstored_restart
    try:
        if old is not None:
            if old.running:
                raise ClusterError("xenstored is still running")
            cluster.sup.forget(old)
        (cluster.state_dir / "xenstored.sock").unlink(missing_ok=True)
        child, _unix, _tcp = await _spawn_xenstored(
            cluster.sup, cluster.state_dir, cluster.xenstored_args
        )
        log.info("xenstored restarted", pid=child.pid)
        return child
    finally:
        cluster.xenstored_restart = None
        if event is not None:
            event.set()


async def _spawn_until_ready(
    sup: Supervisor, kind: str, args: list[str], log_path: Path, read_fd: int, write_fd: int
) -> tuple[Child, bytes]:
    """Spawn `kind` (named as its kind) with the write end of its ready pipe, and return it
    with the first line it writes there (b"" if it wrote none in time)."""
    try:
        child = await sup.spawn(kind, kind, args, log_path, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    line = b""
    async with trio.lowlevel.FdStream(read_fd) as stream:
        with trio.move_on_after(XENSTORED_READY_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                line += chunk
    return child, line


def _endpoint(state_dir: Path, name: str, transport: str) -> str:
    if transport == "tcp":
        return f"tcp:127.0.0.1:{_free_tcp_port()}"
    path = state_dir / "links" / f"{name}.sock"
    path.unlink(missing_ok=True)
    return f"unix:{path}"


async def _create(cluster: Cluster) -> None:
    topo, state_dir = cluster.topology, cluster.state_dir
    done = await provision.apply_topology(
        cluster.xs,
        topo,
        endpoint=lambda spec: _endpoint(state_dir, spec.name, topo.transport),
        keys_dir=state_dir / "keys",
        image_dir=state_dir,
    )
    cluster.domids.update(done.domids)
    cluster.devices.extend(done.devices)
    cluster.sup.save()


async def _start_forkserver(sup: Supervisor, state_dir: Path) -> Path:
    """The fork server the domain processes come from (xenpv.toolstack.forkserver)."""
    sock = state_dir / "forkserver.sock"
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    args = [sys.executable, "-m", "xenpv.toolstack.forkserver", "--socket", str(sock)]
    args += ["--ready-fd", str(write_fd)]
    log_path = state_dir / "logs" / "forkserver.log"
    child, line = await _spawn_until_ready(sup, "forkserver", args, log_path, read_fd, write_fd)
    if line.strip() != b"READY":
        raise ClusterError(f"the fork server did not start: {logs.failure_summary(child.tail())}")
    return sock


async def _start_domain(cluster: Cluster, spec: DomainSpec, log_level: str) -> Child:
    return await _start_process(cluster, spec.name, spec.role, [spec], log_level)


async def _start_process(
    cluster: Cluster, name: str, kind: str, specs: Sequence[DomainSpec], log_level: str
) -> Child:
    """One `xenpv domain` process running the domains `specs` (several: a group)."""
    args = [
        *([] if cluster.forkserver is not None else _python()),
        *_log_options(log_level),
        "domain",
        "--xenstore",
        cluster.xenstore_tcp,
    ]
    for index, spec in enumerate(specs):
        flag = "--key-file" if index == 0 else "--also-key-file"
        args += [flag, str(cluster.state_dir / "keys" / f"{spec.name}.key")]
    args += ["--transport", DOMAIN_TRANSPORT[cluster.topology.transport]]
    args += ["--metrics-file", str(cluster.state_dir / "metrics" / f"{name}.json")]
    log_path = cluster.state_dir / "logs" / f"{name}.log"
    return await cluster.sup.spawn(
        name,
        kind,
        args,
        log_path,
        domid=cluster.domids[specs[0].name] if len(specs) == 1 else None,
        forkserver=cluster.forkserver,
    )


async def _start_domains(cluster: Cluster, log_level: str) -> None:
    # Backends first: nothing depends on it (watches), but their logs then read in order.
    groups: dict[str, list[DomainSpec]] = {}
    for spec in sorted(cluster.topology.domains, key=lambda d: d.role != "backend"):
        if spec.group is None:
            await _start_domain(cluster, spec, log_level)
        else:
            groups.setdefault(spec.group, []).append(spec)
    for group, specs in groups.items():  # only guests are grouped
        await _start_process(cluster, f"group-{group}", "guest", specs, log_level)


async def _states(xs: XenstoreClient, device: DeviceId) -> tuple[str, str]:
    fe = parse_state(await xs.try_read(f"{device.frontend}/state")).short
    be = parse_state(await xs.try_read(f"{device.backend}/state")).short
    return fe, be


def _error_paths(device: DeviceId) -> list[str]:
    """Where either end records `xenbus_dev_fatal`'s reason: `error/<own path>/error` under
    its domain (Linux), or `error` in its device directory."""
    paths = []
    for own, domid in (
        (device.backend, device.backend_domid),
        (device.frontend, device.frontend_domid),
    ):
        domain = toolstack.domain_path(domid)
        paths += [f"{domain}/error/{own.removeprefix(domain + '/')}/error", f"{own}/error"]
    return paths


async def _fatal(xs: XenstoreClient, device: DeviceId) -> str | None:
    """Why an end gave `device` up during start-up, or None while it has not."""
    for path in _error_paths(device):
        raw = await xs.try_read(path)
        if raw is not None:
            return raw.decode("utf-8", "replace")
    backend = parse_state(await xs.try_read(f"{device.backend}/state"))
    if backend in (Closing, Closed):
        return f"backend switched to {backend.short}"
    return None


class _Readiness:
    """What start-up still waits for, re-checked only where xenstore changed: each event's
    path leads (through its ancestors) to the one domain or device it concerns, so waiting
    costs O(changes), not O(devices) reads per change (see module doc)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.pending: set[int | DeviceId] = set(cluster.domids.values()) | set(cluster.devices)
        self._owner: dict[str, int | DeviceId] = {}
        for domid in cluster.domids.values():
            self._owner[_ready_path(domid)] = domid
        for device in cluster.devices:
            for path in (device.frontend, device.backend, *_error_paths(device)):
                self._owner[path] = device

    def concerned(self, path: str) -> int | DeviceId | None:
        while path.count("/") > 2:
            owner = self._owner.get(path)
            if owner is not None:
                return owner
            path = path.rpartition("/")[0]
        return None

    async def check(self, item: int | DeviceId) -> None:
        """Drop `item` from `pending` once ready; raise ClusterError when an end gave a
        device up."""
        xs = self.cluster.xs
        if isinstance(item, int):
            if await xs.try_read(_ready_path(item)) is not None:
                self.pending.discard(item)
            return
        fe, be = await _states(xs, item)
        if fe == "Connected" and be == "Connected":
            self.pending.discard(item)
            return
        reason = await _fatal(xs, item)
        if reason is not None:
            who = f"{self.cluster.name_of(item.frontend_domid)}/{item.cls}{item.devid}"
            why = _device_complaint(self.cluster, item) or reason
            raise ClusterError(f"{who} failed (frontend {fe}, backend {be}): {why}")

    def summary(self) -> str:
        domains = sum(isinstance(p, int) for p in self.pending)
        devices = len(self.pending) - domains
        total_domains, total_devices = len(self.cluster.domids), len(self.cluster.devices)
        return (
            f"waiting: {total_domains - domains}/{total_domains} domains ready, "
            f"{total_devices - devices}/{total_devices} devices Connected"
        )


def _ready_path(domid: int) -> str:
    return f"/local/domain/{domid}/xenpv/ready"


async def wait_connected(
    cluster: Cluster, limit_s: float, progress: Progress = NO_PROGRESS
) -> None:
    """Return once every domain is ready and every device is Connected on both ends; fail
    at once when an end gives a device up (see module doc). One watch on `/local/domain`."""
    readiness = _Readiness(cluster)
    with trio.move_on_after(limit_s) as scope:
        async with cluster.xs.watch("/local/domain") as events:
            while readiness.pending:
                for each in list(readiness.pending):  # all once; then only what changes
                    await readiness.check(each)
                # xenstored drops events a slow reader lets pile up (server.py): every
                # RESYNC_S, what is still pending is re-checked.
                with trio.move_on_after(RESYNC_S):
                    async for path, _token in events:
                        if not readiness.pending:
                            break
                        progress.show(readiness.summary())
                        item = readiness.concerned(path)
                        if item is not None and item in readiness.pending:
                            await readiness.check(item)
                        if not readiness.pending:
                            break
    if scope.cancelled_caught:
        pending = await _not_ready(cluster, explain=True)
        raise ClusterError(f"not ready after {limit_s:g} s: " + "; ".join(pending))


async def _not_ready(cluster: Cluster, *, explain: bool = False) -> list[str]:
    out: list[str] = []
    for name, domid in cluster.domids.items():
        if await cluster.xs.try_read(f"/local/domain/{domid}/xenpv/ready") is None:
            out.append(f"domain {name} ({domid}) not ready")
    for device in cluster.devices:
        fe, be = await _states(cluster.xs, device)
        if fe == "Connected" and be == "Connected":
            continue
        who = f"{cluster.name_of(device.frontend_domid)}/{device.cls}{device.devid}"
        why = _device_complaint(cluster, device) if explain else ""
        out.append(f"{who} frontend {fe}, backend {be}" + (f" ({why})" if why else ""))
    return out


def _device_complaint(cluster: Cluster, device: DeviceId) -> str:
    """The last warning or error either end's domain process logged about `device`."""
    found = ""
    for domid, end in ((device.backend_domid, "backend"), (device.frontend_domid, "frontend")):
        child = next((c for c in cluster.children if c.domid == domid), None)
        if child is None:
            continue
        try:
            lines = child.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(entry, dict)
                and entry.get("device") == str(device)
                and entry.get("level") in ("warning", "error", "critical")
            ):
                detail = f": {entry['error']}" if "error" in entry else ""
                found = found or f"{end} says: {entry.get('event')}{detail}"
                break
    return found


def _last_error(child: Child) -> str:
    """The last error logged by a child (its JSON log), else the end of its log."""
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    last = logs.last_logged_error(lines)
    if last is not None:
        return last
    if lines and not lines[-1].startswith("{"):
        return lines[-1][-300:]  # not one of its JSON log lines: e.g. Python's last words
    return f"no error logged (see {child.log})"


def _exit_message(child: Child, code: int | None) -> str:
    how = describe_status(code) if code is not None else "exited"
    return f"{child.kind} {child.name} (pid {child.pid}) {how}: {_last_error(child)}"


async def _fail_on_exit(children: list[Child]) -> None:
    """During start-up: raise ClusterError as soon as any child process exits."""
    async with trio.open_nursery() as nursery:
        for child in list(children):
            nursery.start_soon(_raise_on_exit, child)


async def _raise_on_exit(child: Child) -> None:
    code = await wait_exit(child)
    raise ClusterError(_exit_message(child, code))


# -- after start-up: a domain's death -----------------------------------------------------------


async def _watch_deaths(cluster: Cluster, on_exit: OnExit, log_level: str) -> None:
    """Handle each domain process's exit (restart policy, else `on_exit`); xenstored's exit
    always ends the cluster."""
    async with trio.open_nursery() as nursery:
        for child in list(cluster.children):
            nursery.start_soon(_on_death, cluster, child, on_exit, log_level)


async def _on_death(cluster: Cluster, child: Child, on_exit: OnExit, log_level: str) -> None:
    while True:
        code = await wait_exit(child)
        message = _exit_message(child, code)
        if child.kind == "xenstored":
            restart = cluster.xenstored_restart
            if restart is not None:  # killed on purpose: follow the new one, if any
                await restart.wait()
                new = _xenstored(cluster)
                if new is not None and new is not child and new.running:
                    child = new
                    continue
            raise ClusterError(message)
        if child.name not in cluster.domids:
            raise ClusterError(message)
        cluster.domain_event(child.name, "down")
        spec = cluster.topology.domain(child.name)
        failed = code is None or code != 0
        restarts = cluster.restarts.get(child.name, 0)
        if spec.restart == "on-failure" and failed and restarts < MAX_RESTARTS:
            log.warning("domain process died; restarting it", domain=child.name, why=message)
            try:
                child = await _restart(cluster, child, spec, log_level)
                cluster.domain_event(child.name, "up")
                continue
            except (XenpvError, OSError) as exc:
                message += f"; restarting it failed: {exc}"
        if on_exit == "fail":
            raise ClusterError(message)
        log.error("domain process died", domain=child.name, why=message)
        await _record_dead(cluster, child, code, message)
        return


async def _destroy_records(cluster: Cluster, domid: int) -> None:
    """Destroy a domain in xenstore as the toolstack does (RELEASE fires `@releaseDomain`, so
    its peers close its devices), with every device it is an end of."""
    for device in cluster.devices:
        if domid in (device.frontend_domid, device.backend_domid):
            await devices.destroy_device(cluster.xs, device)
    with contextlib.suppress(toolstack.ToolstackError):
        await toolstack.destroy_domain(cluster.xs, domid)


async def _record_dead(cluster: Cluster, child: Child, code: int | None, message: str) -> None:
    assert child.domid is not None
    record = {
        "domid": child.domid,
        "pid": child.pid,
        "status": code,
        "reason": message,
        "log": str(child.log),
    }
    with trio.CancelScope(shield=True):
        cluster.dead[child.name] = record
        cluster.sup.save()
        with contextlib.suppress(XsError, XenpvError, OSError):
            await _destroy_records(cluster, child.domid)
            path = f"{DEAD_ROOT}/{child.name}"
            await cluster.xs.write(path, json.dumps(record))
            await cluster.xs.set_perms(path, ["n0", "r0"])  # readable by every domain


async def _restart(cluster: Cluster, child: Child, spec: DomainSpec, log_level: str) -> Child:
    """Re-create the domain (same domid, new key) and its devices, and start its process."""
    assert child.domid is not None
    with trio.CancelScope(shield=True):
        cluster.restarts[spec.name] = cluster.restarts.get(spec.name, 0) + 1
        cluster.sup.children.remove(child)
        await _destroy_records(cluster, child.domid)
        created = await toolstack.create_domain(
            cluster.xs,
            name=spec.name,
            page_size=spec.page_size,
            memory_bytes=spec.memory,
            endpoint=_endpoint(cluster.state_dir, spec.name, cluster.topology.transport),
            domid=child.domid,
            max_maptrack=toolstack.BACKEND_MAX_MAPTRACK if spec.role == "backend" else None,
            max_event_channels=(
                toolstack.BACKEND_MAX_EVENT_CHANNELS if spec.role == "backend" else None
            ),
        )
        created.key.save(cluster.state_dir / "keys" / f"{spec.name}.key")
        # Only the devices are wanted: no endpoints (`_endpoint` would unlink live sockets).
        plan = provision.plan_topology(
            cluster.topology, endpoint=lambda _spec: "", image_dir=cluster.state_dir
        )
        for ident, device in provision.plan_devices(plan, cluster.domids):
            if child.domid in (ident.frontend_domid, ident.backend_domid):
                await provision.create_device(cluster.xs, ident, device)
        restarted = await _start_domain(cluster, spec, log_level)
    return restarted


async def read_dead(xs: XenstoreClient) -> dict[str, dict[str, Any]]:
    """The dead domains a supervisor recorded in xenstore (name → record)."""
    dead: dict[str, dict[str, Any]] = {}
    for name in await xs.try_directory(DEAD_ROOT):
        raw = await xs.try_read(f"{DEAD_ROOT}/{name}")
        try:
            value = json.loads(raw or b"")
        except ValueError:
            value = {"reason": "unreadable record"}
        dead[name] = value if isinstance(value, dict) else {"reason": str(value)}
    return dead


# -- stopping -------------------------------------------------------------------------------------


async def _remove_records(cluster: Cluster) -> None:
    # A connection of its own: the launcher's may have been cancelled with the command.
    async with connect(cluster.xenstore_unix, reconnect_timeout=1.0) as xs:
        for device in cluster.devices:
            await devices.destroy_device(xs, device)
        for domid in cluster.domids.values():
            with contextlib.suppress(toolstack.ToolstackError, XsError):
                await toolstack.destroy_domain(xs, domid)


def _remove_files(state_dir: Path) -> None:
    for path in (state_dir / "links").glob("*.sock"):
        path.unlink(missing_ok=True)
    (state_dir / "xenstored.sock").unlink(missing_ok=True)
    (state_dir / "forkserver.sock").unlink(missing_ok=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / (STATE_FILE + ".tmp")).unlink(missing_ok=True)


def _check_images(topology: Topology, state_dir: Path) -> None:
    for i, vbd in enumerate(topology.vbds):
        image = provision.image_path(vbd.image, state_dir)
        if vbd.read_only and image is not None and not os.path.exists(image):
            raise TopologyError(f"vbd[{i}].image", f"{image} does not exist (read-only disk)")


def prepare(state_dir: Path) -> None:
    if not state_dir.is_absolute():
        raise ClusterError(f"state directory {state_dir} must be an absolute path")
    for sub in ("", "keys", "logs", "links"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir / "keys", 0o700)
    if len(str(state_dir / "links" / "a-domain-name-of-some-length.sock")) > 100:
        raise ClusterError(
            f"state directory {state_dir} is too long for Unix socket paths; use a shorter one"
        )


@asynccontextmanager
async def launch(
    topology: Topology,
    state_dir: Path,
    *,
    sup: Supervisor | None = None,
    ready_timeout_s: float = DEFAULT_TIMEOUT,
    log_level: str = "info",
    on_exit: OnExit = "fail",
    progress: Progress = NO_PROGRESS,
) -> AsyncIterator[Cluster]:
    """Start the cluster and yield it once every device is Connected (see module doc).

    Leaving the block (normally, by an error or by cancellation) stops every process started
    here and removes the sockets and `cluster.json`; logs stay in `state_dir/logs`."""
    # Children log to files: at least at info, so a failure can be explained from them.
    log_level = "debug" if log_level == "debug" else "info"
    prepare(state_dir)
    sup = sup if sup is not None else Supervisor()
    try:
        lock = lock_state_dir(state_dir, _busy(state_dir))
    except XenpvError as exc:
        raise ClusterError(str(exc)) from None
    try:
        _check_no_stale_processes(state_dir)
        _check_images(topology, state_dir)
        quota_plan = plan_quotas(topology)  # fails before anything starts
    except BaseException:
        unlock_state_dir(state_dir, lock)  # and touch nothing: the files may be in use
        raise
    try:
        sup.state_file = state_dir / STATE_FILE
        tcp = topology.xenstore_tcp or "127.0.0.1:0"
        started = time.monotonic()
        progress.show("starting xenstored")
        _child, unix, tcp_addr, xenstored_args = await _start_xenstored(
            sup, state_dir, tcp, log_level, quota_plan.xenstored_args()
        )
        async with connect(unix) as xs:
            cluster = Cluster(topology, state_dir, xs, unix, tcp_addr, sup)
            cluster.xenstored_args = xenstored_args
            sup.describe = cluster.describe
            sup.save()
            progress.show("creating the domains and their devices in xenstore")
            await _create(cluster)
            progress.show("starting the domain processes")
            if topology.start == "fork":
                cluster.forkserver = await _start_forkserver(sup, state_dir)
            await _start_domains(cluster, log_level)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_fail_on_exit, cluster.children)
                    await wait_connected(cluster, ready_timeout_s, progress)
                    nursery.cancel_scope.cancel()
            finally:
                progress.close()
            log.debug("cluster up", seconds=round(time.monotonic() - started, 2))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_deaths, cluster, on_exit, log_level)
                try:
                    yield cluster
                finally:
                    nursery.cancel_scope.cancel()
                    await _stop(cluster)
    finally:
        with trio.CancelScope(shield=True):
            await sup.stop()  # what is left: all of it if start-up failed
            _remove_files(state_dir)
            unlock_state_dir(state_dir, lock)


async def _stop(cluster: Cluster) -> None:
    """Guests, backends, then the xenstore records while xenstored runs; xenstored itself
    stops once the launcher's own connection is closed (else that client would log a lost
    connection and try to reconnect)."""

    async def remove_records() -> None:
        await _remove_records(cluster)

    await cluster.sup.stop(before_xenstored=remove_records, xenstored=False)


# -- a cluster run by a detached supervisor -------------------------------------------------------


async def start_detached(
    sup: Supervisor,
    topology_file: Path,
    state_dir: Path,
    *,
    ready_timeout_s: float,
    log_level: str,
    progress: Progress = NO_PROGRESS,
) -> None:
    """Start `xenpv cluster up FILE --ready-fd N` as a detached supervisor (its own session,
    output in logs/supervisor.log) and return once it reports the cluster ready; it keeps
    running. A failure raises ClusterError with the supervisor's own error line."""
    prepare(state_dir)
    check_free(state_dir)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    args = [
        *_python(),
        *_log_options(log_level),
        "cluster",
        "up",
        str(topology_file),
        "--state-dir",
        str(state_dir),
        "--timeout",
        str(ready_timeout_s),
        "--ready-fd",
        str(write_fd),
    ]
    log_path = state_dir / "logs" / SUPERVISOR_LOG
    log_path.unlink(missing_ok=True)
    try:
        child = await sup.spawn(SUPERVISOR, SUPERVISOR, args, log_path, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    progress.show(f"starting the cluster (supervisor pid {child.pid})")
    line = b""
    try:
        async with trio.lowlevel.FdStream(read_fd) as stream:
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                line += chunk
    finally:
        progress.close()
    if line.strip() == b"READY":
        sup.children.remove(child)  # it is on its own now: ours no longer to stop
        return
    code = await wait_exit(child)
    raise ClusterError(_supervisor_error(child, code))


def _supervisor_error(child: Child, code: int | None) -> str:
    """The supervisor's own one-line error (the CLI's `xenpv: error: ...`), else its tail."""
    for line in reversed(child.tail().splitlines()):
        if line.startswith("xenpv: error: "):
            return line.removeprefix("xenpv: error: ")
    how = describe_status(code) if code is not None else "exited"
    return f"the cluster supervisor {how}: {child.tail()[-300:] or 'no output'}"


def report_ready(ready_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)


async def down(state_dir: Path) -> list[str]:
    """Stop the cluster recorded in `state_dir` (absolute): ask its supervisor to stop it
    (SIGTERM), or stop the processes a dead supervisor left; returns the names stopped."""
    state = read_state(state_dir)
    holder = lock_holder(state_dir)
    if state is None and holder is None:
        raise ClusterError(f"no cluster in {state_dir} (no {STATE_FILE})")
    names = [p["name"] for p in (state or {}).get("processes", []) if p.get("kind") != "xenstored"]
    if holder:
        supervisor = Child(SUPERVISOR, SUPERVISOR, holder, state_dir / "logs" / SUPERVISOR_LOG)
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGTERM)
        with trio.move_on_after(DOWN_TIMEOUT):
            await wait_exit(supervisor)
        if alive(holder):
            log.warning("the supervisor did not stop; killing it", pid=holder)
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, signal.SIGKILL)
            await wait_exit(supervisor)
    # What a dead (or killed) supervisor left behind.
    state = read_state(state_dir)
    if state is not None:
        left = Supervisor(
            children=[
                Child(p["name"], p["kind"], int(p["pid"]), Path(p["log"]), p.get("domid"))
                for p in state.get("processes", [])
                if alive(int(p.get("pid", 0)))
            ]
        )
        await left.stop()
        _remove_files(state_dir)
        shutil.rmtree(state_dir / "xenstore", ignore_errors=True)
    return [n for n in names if n != SUPERVISOR]


def xenstore_address(state_dir: Path) -> str:
    """The dom0 address of the cluster in `state_dir` (for status)."""
    state = read_state(state_dir.resolve())
    if state is None:
        raise ClusterError(f"no cluster in {state_dir} (no {STATE_FILE})")
    unix = state.get("xenstore", {}).get("unix")
    if not isinstance(unix, str):
        raise ClusterError(f"{state_dir / STATE_FILE}: no xenstore address (yet)")
    return unix
