"""The local launcher: a topology → xenstored + one `xenpv domain` process per domain.

    async with launch(topology, state_dir) as cluster:     # every device Connected here
        status = await read_status(cluster.xs)
    # leaving the block stops every process it started (guests first, see `stop`)

What `launch` does, as the toolstack (dom0):
1. starts `xenpv xenstored` with its Unix socket in the state directory and a TCP listener
   (the topology's `[xenstore] tcp`, default 127.0.0.1:0) for the domains, and waits for its
   `--ready-fd` line;
2. creates every domain (`toolstack.create_domain`), writing its key file (0600) in
   `keys/`; the link endpoint is a Unix socket in `links/` (transport auto/shm/socket) or a
   free TCP port on 127.0.0.1 (transport tcp, the socket-copy path over TCP);
3. writes every device (`devices.create_vbd/create_vif`); vbd `devid`s are xvda, xvdb, ...
   per guest, vif `devid`s 0, 1, ... per guest; relative image paths are under the state dir;
4. starts one `xenpv domain` process per domain (logs in `logs/<name>.log`);
5. waits, with watches, until every domain wrote `xenpv/ready` and every device is Connected
   on both ends; a timeout raises `ClusterError` naming each stuck device and its two states,
   a domain process that exits raises it with the end of that process's log.
Every child runs in its own session, so a Ctrl-C typed at the launcher's terminal reaches
only the launcher, which stops them in order. Detached (`detach=True`), they survive the
launcher; their pids go to `cluster.json` in the state dir, which `down` reads.

Stopping (`stop`, also `xenpv cluster down`): guests get SIGTERM first (their frontends close
through xenbus while the backends still run), then backends, each with a grace period before
SIGKILL; then the devices and domains are destroyed in xenstore and xenstored is stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.toolstack import devices, provision
from xenpv.toolstack import domains as toolstack
from xenpv.toolstack.topology import Topology, TopologyError
from xenpv.xenbus.core import DeviceId, parse_state
from xenpv.xenstore.client import XenstoreClient, connect

log = structlog.get_logger()

STATE_FILE = "cluster.json"
XENSTORED_READY_TIMEOUT = 20.0
DEFAULT_TIMEOUT = 60.0
STOP_GRACE = 10.0
LOG_TAIL = 1500
DOMAIN_TRANSPORT = {"auto": "auto", "shm": "shm", "socket": "socket", "tcp": "socket"}


class ClusterError(XenpvError):
    """The cluster cannot be started, reached or stopped as asked."""


@dataclass(slots=True)
class Child:
    """A process the launcher started (or, after `down`, found in cluster.json)."""

    name: str
    kind: str  # "xenstored" | "backend" | "guest"
    pid: int
    log: Path
    domid: int | None = None
    proc: trio.Process | None = None

    def tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL:].strip()


@dataclass(slots=True)
class Cluster:
    topology: Topology
    state_dir: Path
    xs: XenstoreClient
    xenstore_unix: str
    xenstore_tcp: str
    domids: dict[str, int] = field(default_factory=dict)
    devices: list[DeviceId] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    def name_of(self, domid: int) -> str:
        for name, d in self.domids.items():
            if d == domid:
                return name
        return str(domid)


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _python() -> list[str]:
    return [sys.executable, "-m", "xenpv"]


def _alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


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


def _check_no_cluster(state_dir: Path) -> None:
    state = read_state(state_dir)
    if state is None:
        return
    live = [p["name"] for p in state.get("processes", []) if _alive(int(p.get("pid", 0)))]
    if live:
        raise ClusterError(
            f"a cluster is already running in {state_dir} ({', '.join(live)}); "
            f"stop it with: xenpv cluster down --state-dir {state_dir}"
        )
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def _open_log(path: Path) -> Any:
    return open(path, "ab")  # the caller closes it


async def _spawn(
    args: Sequence[str], log_path: Path, *, pass_fds: Sequence[int] = ()
) -> trio.Process:
    with _open_log(log_path) as logf:
        return await trio.lowlevel.open_process(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=tuple(pass_fds),
            # Own session: a Ctrl-C in the terminal reaches only the launcher, which then
            # stops the children in order (guests, backends, xenstored).
            start_new_session=True,
        )


async def _start_xenstored(state_dir: Path, tcp: str, log_level: str) -> tuple[Child, str, str]:
    sock = state_dir / "xenstored.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    data = state_dir / "xenstore"
    shutil.rmtree(data, ignore_errors=True)  # a new cluster starts from an empty store
    read_fd, write_fd = os.pipe()
    args = [
        *_python(),
        "--log-level",
        log_level,
        "--log-format",
        "json",
        "xenstored",
        "--socket",
        str(sock),
        "--data-dir",
        str(data),
        "--tcp",
        tcp,
        "--ready-fd",
        str(write_fd),
    ]
    log_path = state_dir / "logs" / "xenstored.log"
    try:
        proc = await _spawn(args, log_path, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    child = Child("xenstored", "xenstored", proc.pid, log_path, proc=proc)
    line = b""
    async with trio.lowlevel.FdStream(read_fd) as stream:
        with trio.move_on_after(XENSTORED_READY_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                line += chunk
    words = line.decode(errors="replace").split()
    if not words or words[0] != "READY":
        await _terminate([child], grace=2.0)
        raise ClusterError(f"xenstored did not start: {child.tail() or 'no output'}")
    unix = next(w for w in words if w.startswith("unix:"))
    tcp_addr = next((w for w in words if w.startswith("tcp:")), "")
    return child, unix, tcp_addr


def _endpoint(state_dir: Path, name: str, transport: str) -> str:
    if transport == "tcp":
        return f"tcp:127.0.0.1:{_free_tcp_port()}"
    path = state_dir / "links" / f"{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
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


async def _start_domains(cluster: Cluster, log_level: str) -> None:
    transport = DOMAIN_TRANSPORT[cluster.topology.transport]
    # Backends first: nothing depends on it (watches), but their logs then read in order.
    for spec in sorted(cluster.topology.domains, key=lambda d: d.role != "backend"):
        log_path = cluster.state_dir / "logs" / f"{spec.name}.log"
        args = [
            *_python(),
            "--log-level",
            log_level,
            "--log-format",
            "json",
            "domain",
            "--xenstore",
            cluster.xenstore_tcp,
            "--key-file",
            str(cluster.state_dir / "keys" / f"{spec.name}.key"),
            "--transport",
            transport,
        ]
        proc = await _spawn(args, log_path)
        cluster.children.append(
            Child(spec.name, spec.role, proc.pid, log_path, cluster.domids[spec.name], proc)
        )
        log.debug("domain process started", domain=spec.name, pid=proc.pid)


async def _states(xs: XenstoreClient, device: DeviceId) -> tuple[str, str]:
    fe = parse_state(await xs.try_read(f"{device.frontend}/state")).short
    be = parse_state(await xs.try_read(f"{device.backend}/state")).short
    return fe, be


async def _watch_into(
    xs: XenstoreClient,
    path: str,
    changed: trio.MemorySendChannel[None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with xs.watch(path) as events:
        task_status.started()
        async for _event in events:
            with contextlib.suppress(trio.WouldBlock):
                changed.send_nowait(None)


async def wait_connected(cluster: Cluster, limit_s: float) -> None:
    """Return once every domain is ready and every device is Connected on both ends."""
    xs = cluster.xs
    send, recv = trio.open_memory_channel[None](1)
    paths = [f"/local/domain/{d}/xenpv/ready" for d in cluster.domids.values()]
    for device in cluster.devices:
        paths += [f"{device.frontend}/state", f"{device.backend}/state"]
    pending: list[str] = []
    with trio.move_on_after(limit_s) as scope:
        async with trio.open_nursery() as nursery:
            for path in paths:
                await nursery.start(_watch_into, xs, path, send)
            while True:
                pending = await _not_ready(cluster)
                if not pending:
                    break
                await recv.receive()
            nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        pending = await _not_ready(cluster, explain=True)
        raise ClusterError(f"not ready after {limit_s:.0f} s: " + "; ".join(pending))


async def _not_ready(cluster: Cluster, *, explain: bool = False) -> list[str]:
    out: list[str] = []
    for name, domid in cluster.domids.items():
        if await cluster.xs.try_read(f"/local/domain/{domid}/xenpv/ready") is None:
            out.append(f"domain {name} ({domid}) not ready")
    for device in cluster.devices:
        fe, be = await _states(cluster.xs, device)
        if fe != "Connected" or be != "Connected":
            who = f"{cluster.name_of(device.frontend_domid)}/{device.cls}{device.devid}"
            why = ""
            if explain:
                why = _device_complaint(cluster, device)
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


async def _watch_children(children: list[Child]) -> None:
    """Raise ClusterError as soon as any child process exits."""
    async with trio.open_nursery() as nursery:
        for child in children:
            if child.proc is not None:
                nursery.start_soon(_child_exit, child)


async def _child_exit(child: Child) -> None:
    assert child.proc is not None
    code = await child.proc.wait()
    raise ClusterError(
        f"{child.kind} {child.name} (pid {child.pid}) exited with status {code}: "
        f"{_last_error(child)}"
    )


def _last_error(child: Child) -> str:
    """The last error logged by a child (its JSON log), else the end of its log."""
    try:
        lines = child.log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
            return str(entry.get("event")) + (f": {entry['error']}" if "error" in entry else "")
    return lines[-1][-300:] if lines else "no output"


def _write_state(cluster: Cluster) -> None:
    state = {
        "xenstore": {"unix": cluster.xenstore_unix, "tcp": cluster.xenstore_tcp},
        "domains": cluster.domids,
        "devices": [
            {
                "cls": d.cls,
                "frontend": d.frontend_domid,
                "backend": d.backend_domid,
                "devid": d.devid,
            }
            for d in cluster.devices
        ],
        "processes": [
            {"name": c.name, "kind": c.kind, "pid": c.pid, "log": str(c.log), "domid": c.domid}
            for c in cluster.children
        ],
    }
    tmp = cluster.state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(cluster.state_dir / STATE_FILE)


async def _wait_pid(child: Child) -> None:
    if child.proc is not None:
        await child.proc.wait()
        return
    try:
        fd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def _signal(child: Child, sig: int) -> None:
    if child.proc is not None:
        if child.proc.returncode is None:
            child.proc.send_signal(sig)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(child.pid, sig)


async def _terminate(children: list[Child], grace: float = STOP_GRACE) -> None:
    """SIGTERM, wait up to `grace` seconds, SIGKILL whatever is left; reap everything."""
    if not children:
        return
    for child in children:
        _signal(child, signal.SIGTERM)
    with trio.move_on_after(grace):
        async with trio.open_nursery() as nursery:
            for child in children:
                nursery.start_soon(_wait_pid, child)
    for child in children:
        if (child.proc is not None and child.proc.returncode is None) or (
            child.proc is None and _alive(child.pid)
        ):
            log.warning("killing a process that did not stop", process=child.name, pid=child.pid)
            _signal(child, signal.SIGKILL)
    with trio.move_on_after(grace):
        async with trio.open_nursery() as nursery:
            for child in children:
                nursery.start_soon(_wait_pid, child)


async def stop(
    children: list[Child], xenstore_unix: str | None, devices_: Sequence[DeviceId] = ()
) -> None:
    """Stop a cluster: guests, then backends, then the xenstore records, then xenstored."""
    with trio.CancelScope(shield=True):
        await _terminate([c for c in children if c.kind == "guest"])
        await _terminate([c for c in children if c.kind == "backend"])
        if xenstore_unix is not None and any(c.kind == "xenstored" for c in children):
            with trio.move_on_after(5), contextlib.suppress(XenpvError, OSError):
                async with connect(xenstore_unix, reconnect_timeout=1.0) as xs:
                    for device in devices_:
                        await devices.destroy_device(xs, device)
                    for child in children:
                        if child.domid is not None:
                            await toolstack.destroy_domain(xs, child.domid)
        await _terminate([c for c in children if c.kind == "xenstored"])


def _check_images(topology: Topology, state_dir: Path) -> None:
    for i, vbd in enumerate(topology.vbds):
        image = provision.image_path(vbd.image, state_dir)
        if vbd.read_only and image is not None and not os.path.exists(image):
            raise TopologyError(f"vbd[{i}].image", f"{image} does not exist (read-only disk)")


def _prepare(state_dir: Path) -> None:
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
    detach: bool = False,
    ready_timeout_s: float = DEFAULT_TIMEOUT,
    log_level: str = "info",
) -> AsyncIterator[Cluster]:
    """Start the cluster and yield it once every device is Connected (see module doc).

    Not detached: leaving the block (normally, by an error or by cancellation) stops every
    process started here. Detached: the processes keep running and `cluster.json` lists them.
    """
    # Children log to files: at least at info, so a failure can be explained from them.
    log_level = "debug" if log_level == "debug" else "info"
    _prepare(state_dir)
    _check_no_cluster(state_dir)
    _check_images(topology, state_dir)
    tcp = topology.xenstore_tcp or "127.0.0.1:0"
    started = time.monotonic()
    xenstored, unix, tcp_addr = await _start_xenstored(state_dir, tcp, log_level)
    children = [xenstored]
    devices_: list[DeviceId] = []
    keep = False
    try:
        async with connect(unix) as xs:
            cluster = Cluster(topology, state_dir, xs, unix, tcp_addr, children=children)
            await _create(cluster)
            devices_ = cluster.devices
            await _start_domains(cluster, log_level)
            if detach:
                _write_state(cluster)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_children, cluster.children)
                await wait_connected(cluster, ready_timeout_s)
                nursery.cancel_scope.cancel()
            log.debug("cluster up", seconds=round(time.monotonic() - started, 2))
            if detach:
                keep = True
                yield cluster
                return
            # Foreground: while the caller's block runs, a child's exit cancels it with a
            # ClusterError naming that child.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_children, cluster.children)
                try:
                    yield cluster
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        first = _first_error(group)
        if first is not None:
            raise first from None
        raise
    finally:
        if not keep:
            await stop(children, unix, devices_)
            with contextlib.suppress(FileNotFoundError):
                (state_dir / STATE_FILE).unlink()


def _first_error(group: BaseExceptionGroup[BaseException]) -> XenpvError | None:
    for exc in group.exceptions:
        if isinstance(exc, XenpvError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
    return None


async def down(state_dir: Path) -> list[str]:
    """Stop the detached cluster recorded in `state_dir` (absolute); returns the names it
    stopped."""
    state = read_state(state_dir)
    if state is None:
        raise ClusterError(f"no cluster in {state_dir} (no {STATE_FILE})")
    children = [
        Child(p["name"], p["kind"], int(p["pid"]), Path(p["log"]), p.get("domid"))
        for p in state.get("processes", [])
    ]
    devices_ = [
        DeviceId(d["cls"], int(d["frontend"]), int(d["backend"]), int(d["devid"]))
        for d in state.get("devices", [])
    ]
    live = [c for c in children if _alive(c.pid)]
    await stop(live, state.get("xenstore", {}).get("unix"), devices_)
    for path in (state_dir / "links").glob("*.sock"):
        path.unlink(missing_ok=True)
    (state_dir / "xenstored.sock").unlink(missing_ok=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return [c.name for c in live]


def xenstore_address(state_dir: Path) -> str:
    """The dom0 address of the cluster in `state_dir` (for status)."""
    state = read_state(state_dir.resolve())
    if state is None:
        raise ClusterError(f"no cluster in {state_dir} (no {STATE_FILE})")
    unix = state.get("xenstore", {}).get("unix")
    if not isinstance(unix, str):
        raise ClusterError(f"{state_dir / STATE_FILE}: no xenstore address")
    return unix
