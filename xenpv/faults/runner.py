"""`xenpv faults run`: a plan's schedule against a real cluster, end to end.

    result = await run_plan(plan, seed, state_dir, sup)      # under supervisor.run

1. builds the schedule and refuses, before starting anything, a fault kind the run cannot
   inject (`injectable`); every domain gets `restart = "on-failure"`, so a killed domain
   comes back as a crashed guest would be restarted by its toolstack;
2. starts the topology's cluster under the supervisor (`toolstack.cluster.launch`, with
   `XENPV_FAULTS=1` so that backends wrap their disks for storage faults);
3. publishes the run on every control node (`xenpv.faults.control`): the agents
   (`xenpv.faults.agent`, one per domain; `xenpv.faults.xsagent` in xenstored) start their
   guests' workloads and history files;
4. follows the schedule (`injectors.follow`): a fault is started by rewriting the control
   nodes of the domains that apply it (`recipients`) or, for `process.*`, by a signal to the
   domain's process (`ProcessInjector`; the supervisor restarts what was killed), or, for
   `device.detach-reattach`, by the runner itself (dom0 has the toolstack: `DeviceInjector`
   detaches the device through the xenbus close handshake and re-attaches it at the stop);
5. after the last heal: the `probe` phase (every guest runs a probe I/O on each device until
   one works), the quiet tail, then `drain` (senders stop, frames in flight arrive) and
   `stop` (agents close their history files and say so);
6. clears every control node (shielded, whatever ended the run), stops the cluster, merges
   the history files into one history and runs the checkers.

Device states (`state` lines) are recorded by the runner, which watches both ends of every
device as dom0 does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from xenpv import clock
from xenpv.errors import XenpvError
from xenpv.faults import device as device_faults
from xenpv.faults import hostile, selfprocess, xsagent
from xenpv.faults.catalogue import CATALOGUE
from xenpv.faults.checkers import CHECKERS, Violation, check_all
from xenpv.faults.control import (
    XENSTORED,
    Control,
    ProcessLog,
    RunConfig,
    control_path,
    history_file,
    merge,
)
from xenpv.faults.history import History, read
from xenpv.faults.injectors import Injection, Injector
from xenpv.faults.plan import Plan, resolve_topology
from xenpv.faults.process import ProcessInjector
from xenpv.faults.schedule import Schedule, ScheduledFault, build
from xenpv.faults.targets import DeviceTarget
from xenpv.toolstack import cluster as cluster_mod
from xenpv.toolstack.progress import NO_PROGRESS, Progress
from xenpv.toolstack.supervisor import Supervisor
from xenpv.toolstack.topology import Topology
from xenpv.xenbus.core import domain_path
from xenpv.xenstore.client import XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.client import connect as connect_xenstore
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

AGENT_KINDS = frozenset(
    {
        "event.delay",
        "event.drop",
        "event.duplicate",
        "event.spurious",
        "event.storm",
        "grant.map-fail",
        "grant.batch-element-fail",
        "grant.revoke-while-mapped",
        "link.delay",
        "link.loss",
        "link.duplicate",
        "link.reorder",
        "link.corrupt",
        "link.bandwidth",
        "link.partition",
        "storage.eio",
        "storage.latency",
        "storage.enospc",
        "storage.drop-writes",
        "storage.power-cut",
    }
)
AGENT_KINDS |= hostile.KINDS
XENSTORED_KINDS = xsagent.KINDS
PROCESS_KINDS = frozenset(
    {"process.kill", "process.stop", "process.restart", "xenstore.xenstored-kill"}
)
XENSTORED_KILL = "xenstore.xenstored-kill"
DEVICE_KINDS = frozenset({device_faults.KIND})
INJECTABLE = AGENT_KINDS | XENSTORED_KINDS | PROCESS_KINDS | DEVICE_KINDS
DRAIN = 1.0  # seconds between the senders' stop and the agents' stop
READY_WAIT = 15.0  # seconds every agent has to set its workloads up
STOP_WAIT = 5.0  # seconds agents have to close their history files
CLEAR_TIMEOUT = 5.0
BACK_WAIT = 30.0  # seconds a killed domain may take to come back before its fault stops
RESTARTING = frozenset({"process.kill", "process.restart"})
# Kinds that need the runner's own supervisor, hence not `--attach` (the run's cluster is
# someone else's: compose's, another host's).
SUPERVISED_ONLY = {
    "xenstore.xenstored-kill": "xenstored's restart is up to the cluster's supervisor",
}
# Faults that make domain links fail (xenpv/faults/link.py): the devices across the link
# reconnect after the heal, and the fault window lasts until they have.
LINK_BREAKING = frozenset({"link.loss", "link.partition", "link.corrupt"})
LINK_SETTLE = 0.5  # seconds for a link's death to show in the xenbus states after a heal
READY_NODE = "xenpv/faults/ready"  # an agent's incarnation, written once its workloads are set


class RunError(XenpvError):
    """The plan cannot be run (a fault kind that cannot be injected, ...)."""


def injectable(kind: str) -> bool:
    """A kind `faults run` applies (the catalogue says why the others cannot be yet)."""
    info = CATALOGUE.get(kind)
    return kind in INJECTABLE and info is not None and info.why_not is None


def why_not(kind: str) -> str:
    info = CATALOGUE.get(kind)
    return (info.why_not if info is not None else None) or "unknown kind"


def blocked_kinds(plan: Plan) -> list[str]:
    """The plan's fault kinds `faults run` cannot inject yet (empty: it can run)."""
    return sorted({f.kind for f in plan.faults if not injectable(f.kind)})


def check_injectable(schedule: Schedule, *, attached: bool = False) -> None:
    for fault in schedule.faults:
        if fault.kind == XENSTORED_KILL and not fault.param("restart"):
            raise RunError(
                f"{fault.id}: {XENSTORED_KILL} with restart = false would end the run (every"
                " domain needs xenstore): use restart = true"
            )
        if not injectable(fault.kind):
            raise RunError(
                f"{fault.id}: {fault.kind} cannot be injected by `faults run` yet: "
                f"{why_not(fault.kind)}"
            )
        if attached and fault.kind in SUPERVISED_ONLY:
            raise RunError(
                f"{fault.id}: {fault.kind} cannot be injected with --attach: "
                f"{SUPERVISED_ONLY[fault.kind]}"
            )


def _device(schedule: Schedule, target: str) -> DeviceTarget | None:
    if target.startswith("queue:"):
        target = "device:" + ":".join(target.split(":")[1:4])
    if not target.startswith("device:"):
        return None
    return schedule.topology.device(target)


def recipients(fault: ScheduledFault, schedule: Schedule, *, attached: bool = False) -> list[str]:
    """The domains (by name) or `xenstored` whose agents apply `fault` (see the module doc of
    `xenpv.faults.agent`); [] for the kinds the runner applies itself. In an attached run a
    domain applies process faults to itself (`xenpv.faults.selfprocess`)."""
    family = fault.kind.split(".")[0]
    domains = sorted(schedule.topology.roles)
    if fault.kind in XENSTORED_KINDS:
        return [XENSTORED]
    if attached and fault.kind in selfprocess.KINDS:
        return [fault.target.removeprefix("domain:")]
    if family == "link":
        return domains  # each end filters by (source, destination)
    device = _device(schedule, fault.target)
    if family == "storage":
        return [device.backend] if device else []
    if family == "ring":  # the misbehaving end: see xenpv.faults.hostile
        if device is None:
            return []
        return [device.guest if fault.kind in hostile.FRONT_KINDS else device.backend]
    if family in ("event", "grant"):
        if device is None:
            return [fault.target.removeprefix("domain:")]
        # The guest sends events and grants pages (revoke); the backend maps and copies.
        granter = family == "event" or fault.kind == "grant.revoke-while-mapped"
        return [device.guest if granter else device.backend]
    return []


@dataclass
class ControlInjector:
    """The `Injector` for faults applied by agents: keeps every recipient's active list and
    wakes the publisher, which rewrites the control nodes (start/stop must not block)."""

    schedule: Schedule
    attached: bool = False  # process faults go to the domains' agents too
    active: dict[str, dict[str, ScheduledFault]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    wake: Callable[[], None] = lambda: None

    def handles(self, fault: ScheduledFault) -> bool:
        if self.attached and fault.kind in selfprocess.KINDS:
            return True
        return fault.kind in AGENT_KINDS or fault.kind in XENSTORED_KINDS

    def start(self, fault: ScheduledFault) -> None:
        for who in recipients(fault, self.schedule, attached=self.attached):
            self.active.setdefault(who, {})[fault.id] = fault
            self.dirty.add(who)
        self.wake()

    def stop(self, fault: ScheduledFault) -> None:
        for who in recipients(fault, self.schedule, attached=self.attached):
            if self.active.get(who, {}).pop(fault.id, None) is not None:
                self.dirty.add(who)
        self.wake()

    def faults_of(self, who: str) -> tuple[ScheduledFault, ...]:
        return tuple(self.active.get(who, {}).values())


@dataclass
class RunResult:
    schedule: Schedule
    history: History
    violations: list[Violation]
    history_path: Path

    @property
    def ok(self) -> bool:
        return not self.violations and self.history.finished

    @property
    def faults_injected(self) -> int:
        return sum(1 for op in self.history if op.f == "fault-start")

    @property
    def ops(self) -> int:
        """Completed workload operations (ok, fail or unknown), probes excluded."""
        return sum(
            1
            for op in self.history
            if op.type != "invoke"
            and op.f in ("write", "read", "flush", "send", "recv", "xs-write", "xs-read")
        )

    def per_checker(self) -> dict[str, int]:
        out = dict.fromkeys(CHECKERS, 0)
        for v in self.violations:
            out[v.checker] = out.get(v.checker, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "plan": self.schedule.plan,
            "seed": self.schedule.seed,
            "schedule_hash": self.schedule.hash,
            "faults_injected": self.faults_injected,
            "faults_scheduled": len(self.schedule.faults),
            "ops": self.ops,
            "operations": len(self.history),
            "finished": self.history.finished,
            "checkers": self.per_checker(),
            "violations": [v.to_json() for v in self.violations],
            "history": str(self.history_path),
        }


def run_topology(plan: Plan, schedule: Schedule) -> Topology:
    """The plan's topology with every domain restarted on failure (a killed domain comes
    back, as its toolstack would bring a crashed guest back)."""
    topo = resolve_topology(plan)
    domains = tuple(dataclasses.replace(d, restart="on-failure") for d in topo.domains)
    return dataclasses.replace(topo, domains=domains)


async def _write_node(xs: XenstoreClient, path: str, text: str, reader: int | None) -> None:
    await xs.write(path, text)
    await xs.set_perms(path, ["n0"] if reader is None else ["n0", f"r{reader}"])


async def _macs(xs: XenstoreClient, schedule: Schedule, domids: dict[str, int]) -> dict[str, str]:
    out: dict[str, str] = {}
    for device in schedule.topology.devices:
        if device.cls == "vif":
            path = f"{domain_path(domids[device.guest])}/device/vif/{device.devid}/mac"
            raw = await xs.try_read(path)
            if raw:
                out[device.id] = raw.decode().strip()
    return out


async def _record_states(
    xs: XenstoreClient, schedule: Schedule, domids: dict[str, int], history: ProcessLog
) -> None:
    """`state` lines for both ends of every device, as the runner (dom0) sees them."""

    async def follow_end(device: DeviceTarget, end: str, path: str) -> None:
        key = f"state:{device.guest}:{device.cls}:{device.name}:{end}"
        last: int | None = None
        async with xs.watch(path) as events:
            async for _event in events:
                try:
                    raw = await xs.try_read(path)
                except (XsError, XenstoreConnectionError):
                    continue
                value = int(raw) if raw and raw.strip().isdigit() else 0
                if value != last:
                    history.append("runner", "info", "state", key, value)
                    last = value

    async with trio.open_nursery() as nursery:
        for device in schedule.topology.devices:
            fe, be = domids[device.guest], domids[device.backend]
            front = f"{domain_path(fe)}/device/{device.cls}/{device.devid}/state"
            back = f"{domain_path(be)}/backend/{device.cls}/{fe}/{device.devid}/state"
            nursery.start_soon(follow_end, device, "frontend", front)
            nursery.start_soon(follow_end, device, "backend", back)


async def _wait_for(xs: XenstoreClient, domids: dict[str, int], what: str) -> None:
    """Until every agent wrote `xenpv/faults/<what>` (bounded by the caller)."""
    for domid in domids.values():
        path = f"{domain_path(domid)}/xenpv/faults/{what}"
        async with xs.watch(path) as events:
            async for _event in events:
                with contextlib.suppress(XsError, XenstoreConnectionError):
                    if await xs.try_read(path) is not None:
                        break


async def run_plan(
    plan: Plan,
    seed: int | None,
    state_dir: Path,
    sup: Supervisor,
    *,
    history_path: Path | None = None,
    progress: Progress = NO_PROGRESS,
    log_level: str = "info",
) -> RunResult:
    schedule = build(plan, seed)
    check_injectable(schedule)
    topo = run_topology(plan, schedule)
    history_dir = state_dir / "history"
    fresh_history_dir(history_dir)
    os.environ["XENPV_FAULTS"] = "1"  # the domain processes inherit it (storage wrapping)
    async with cluster_mod.launch(
        topo, state_dir, sup=sup, log_level=log_level, on_exit="record", progress=progress
    ) as cluster:

        def pid_of(name: str) -> int | None:
            for child in cluster.children:
                if child.name == name and child.running:
                    return child.pid
            return None

        processes = ProcessInjector(pid_of, restart=lambda name: None)  # on-failure restarts
        await _run(
            cluster.xs, dict(cluster.domids), processes, schedule, history_dir, progress, cluster
        )
    return collect(schedule, history_dir, history_path or (state_dir / "history.jsonl"))


async def attach_plan(
    plan: Plan,
    seed: int | None,
    xenstore: str,
    history_dir: Path,
    *,
    history_path: Path | None = None,
    progress: Progress = NO_PROGRESS,
) -> RunResult:
    """Run `plan` against a cluster that is already running (compose's, another launcher's):
    xenstore at `xenstore` (dom0's Unix socket), `history_dir` a directory every domain
    process can write too (a shared volume). Nothing is started or stopped here: faults go
    through the control nodes only (process faults too, `xenpv.faults.selfprocess`), and a
    killed domain comes back by the cluster's own restart policy. Backends wrap their disks
    for storage faults only when started with XENPV_FAULTS=1."""
    schedule = build(plan, seed)
    check_injectable(schedule, attached=True)
    fresh_history_dir(history_dir)
    async with connect_xenstore(xenstore) as xs:
        domids = await _domids_by_name(xs, sorted(schedule.topology.roles))
        await _run(xs, domids, None, schedule, history_dir, progress)
    return collect(schedule, history_dir, history_path or (history_dir.parent / "history.jsonl"))


def fresh_history_dir(history_dir: Path) -> None:
    """An empty `history_dir` (the agents append to their files; a shared volume may hold a
    previous run's, so its files are removed, not the directory)."""
    history_dir.mkdir(parents=True, exist_ok=True)
    stale_files = ("*.jsonl", "*.incarnation", "*.applied")
    for stale in [path for pattern in stale_files for path in history_dir.glob(pattern)]:
        stale.unlink(missing_ok=True)


async def _domids_by_name(xs: XenstoreClient, names: list[str]) -> dict[str, int]:
    """The running domains' ids, by the names the plan's topology gives them."""
    found: dict[str, int] = {}
    for entry in await xs.try_directory("/local/domain"):
        if entry.isdigit():
            raw = await xs.try_read(f"/local/domain/{entry}/name")
            if raw is not None:
                found[raw.decode("utf-8", "replace")] = int(entry)
    missing = [name for name in names if name not in found]
    if missing:
        raise RunError(
            f"the cluster has no domain named {', '.join(missing)} (it has: "
            f"{', '.join(sorted(found)) or 'none'}); the plan's topology must be the cluster's"
        )
    return {name: found[name] for name in names}


def collect(schedule: Schedule, history_dir: Path, out: Path) -> RunResult:
    """Merge the run's history files into `out` and check it (also xenpv/sim/)."""
    paths = sorted(history_dir.glob("*.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as stream:
        merge(paths, schedule, stream)
    hist = read(out)
    return RunResult(schedule, hist, check_all(hist), out)


async def _run(
    xs: XenstoreClient,
    domids: dict[str, int],
    processes: ProcessInjector | None,
    schedule: Schedule,
    history_dir: Path,
    progress: Progress,
    cluster: cluster_mod.Cluster | None = None,
) -> None:
    """The run itself; `processes` None: an attached run (process faults by the agents);
    `cluster`: the run's own cluster (None when attached), told to report domains going
    down and up, and asked to restart xenstored."""
    epoch = clock.monotonic()
    origin = trio.current_time()  # the schedule's time 0, set again when every guest is ready
    runner_log = ProcessLog(history_file(history_dir, "runner"), epoch)
    config = RunConfig(
        epoch,
        str(history_dir),
        schedule.seed,
        domids,
        schedule.to_json(),
        await _macs(xs, schedule, domids),
    )
    controls = ControlInjector(schedule, attached=processes is None)
    publish = trio.Event()

    def domain_event(name: str, event: str) -> None:
        # The report's domain lanes and the isolation checker read these.
        runner_log.append("runner", "info", "state", f"domain:{name}", event)

    if cluster is not None:
        cluster.on_domain = domain_event

    def wake() -> None:
        publish.set()

    controls.wake = wake
    phase = ["setup"]

    def node(who: str) -> tuple[str, int | None]:
        if who == XENSTORED:
            return control_path(XENSTORED), None
        return control_path(domids[who]), domids[who]

    async def write_all(names: list[str]) -> None:
        for who in names:
            path, reader = node(who)
            text = Control(config, controls.faults_of(who), phase[0]).encode()
            await _write_node(xs, path, text, reader)

    everyone = [*sorted(domids), XENSTORED]

    async def republish(name: str) -> None:
        await write_all([name])

    async def publisher() -> None:
        nonlocal publish
        while True:
            await publish.wait()
            publish = trio.Event()
            dirty = sorted(controls.dirty)
            controls.dirty.clear()
            await write_all(dirty)

    hotplugs = device_faults.DeviceInjector(xs, schedule.topology, domids)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_record_states, xs, schedule, domids, runner_log)
            nursery.start_soon(publisher)
            await write_all(everyone)
            progress.show("setup: waiting for every guest's workloads")
            with trio.move_on_after(READY_WAIT):
                await _wait_for(xs, domids, "ready")
            origin = trio.current_time()
            phase[0] = "run"
            await write_all(everyone)
            injectors: list[Injector] = [controls, hotplugs]
            if processes is not None:
                injectors.append(processes)
            with Injection(injectors, runner_log) as injection:
                lines = LineCounter(history_dir)

                async def ticker() -> None:
                    while True:
                        elapsed = trio.current_time() - origin
                        started = sum(1 for f in schedule.faults if f.start <= elapsed)
                        progress.show(
                            f"{phase[0]}: {elapsed:5.1f}/{schedule.duration:g} s, "
                            f"~{lines.count() // 2} ops, faults {started}/{len(schedule.faults)}"
                            f" started, {len(injection.active)} active"
                        )
                        await trio.sleep(0.5)

                nursery.start_soon(ticker)
                await _follow(schedule, injection, origin, xs, domids, republish, hotplugs, cluster)
            phase[0] = "probe"
            await write_all(everyone)
            await trio.sleep_until(origin + max(schedule.duration, schedule.last_heal))
            phase[0] = "drain"
            await write_all(everyone)
            await trio.sleep(DRAIN)
            phase[0] = "stop"
            await write_all(everyone)
            with trio.move_on_after(STOP_WAIT):
                await _wait_for(xs, domids, "stopped")
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            progress.close()
            if cluster is not None:
                cluster.on_domain = None
            runner_log.close()
            with trio.move_on_after(CLEAR_TIMEOUT):
                for who in everyone:
                    with contextlib.suppress(XsError, XenstoreConnectionError):
                        await xs.rm(node(who)[0])


class LineCounter:
    """Lines written so far to the history files (the progress display's operation count:
    about two lines per operation), reading only what was appended since the last call."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.total = 0

    def count(self) -> int:
        for path in self.directory.glob("*.jsonl"):
            start = self.offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    chunk = f.read()
            except OSError:
                continue
            self.offsets[path] = start + len(chunk)
            self.total += chunk.count(b"\n")
        return self.total


async def _ready_value(xs: XenstoreClient, domid: int) -> bytes | None:
    with contextlib.suppress(XsError, XenstoreConnectionError):
        return await xs.try_read(f"{domain_path(domid)}/{READY_NODE}")
    return None


async def _back(
    xs: XenstoreClient,
    schedule: Schedule,
    domids: dict[str, int],
    name: str,
    before: bytes | None,
    republish: Callable[[str], Awaitable[None]],
) -> None:
    """Until a killed domain is back: re-created by the supervisor (its control node is then
    written again: xenstored drops a destroyed domain's permissions), its restarted agent
    ready (the ready node changed), and every device it is an end of Connected on both."""
    domid = domids[name]
    base = domain_path(domid)
    stale = True  # it may have been re-created already, before this watch
    async with xs.watch(base) as events:
        async for _event in events:
            with contextlib.suppress(XsError, XenstoreConnectionError):
                exists = await xs.try_read(f"{base}/domid") is not None
                if not exists:
                    stale = True
                elif stale:
                    stale = False
                    await republish(name)
                value = await _ready_value(xs, domid)
                if value is not None and value != before:
                    break
    for device in schedule.topology.devices:
        if name in (device.guest, device.backend):
            fe, be = domids[device.guest], domids[device.backend]
            for path in (
                f"{domain_path(fe)}/device/{device.cls}/{device.devid}/state",
                f"{domain_path(be)}/backend/{device.cls}/{fe}/{device.devid}/state",
            ):
                await _until_connected(xs, path)


async def _until_connected(xs: XenstoreClient, path: str) -> None:
    async with xs.watch(path) as events:
        async for _event in events:
            with contextlib.suppress(XsError, XenstoreConnectionError):
                raw = await xs.try_read(path)
                if raw is not None and raw.strip() == b"4":
                    return


async def _follow(
    schedule: Schedule,
    injection: Injection,
    origin: float,
    xs: XenstoreClient,
    domids: dict[str, int],
    republish: Callable[[str], Awaitable[None]],
    hotplugs: device_faults.DeviceInjector | None = None,
    cluster: cluster_mod.Cluster | None = None,
) -> None:
    """`injectors.follow`, except that a killed domain's fault window lasts until the domain
    is back (`_back`): what it lost while down is the fault's doing, and the history says
    so. Likewise a detached device's window runs from before the detach until it is
    re-attached and Connected again, a killed xenstored's until it is restarted (from its
    persisted store, on the same addresses) and answers, and a link fault's until the devices
    across the link are Connected again. Each recovery is awaited in its own task (bounded by
    BACK_WAIT), so every other heal still happens at its scheduled time: a recovery may need
    another fault healed first (a device re-attached while a grant fault fails every
    connect). Later starts wait only for a domain or xenstored to be back (nothing can be
    injected into a process that is not there yet)."""
    before: dict[str, bytes | None] = {}
    recovering = 0
    recovered = trio.Event()
    recovered.set()

    async def heal(
        fault: ScheduledFault, name: str, restarts: bool, hotplug: bool, xenstored: bool
    ) -> None:
        nonlocal recovering
        try:
            if hotplugs is not None and hotplug:
                await hotplugs.reattach(fault, wait=BACK_WAIT)
            if restarts:
                with trio.move_on_after(BACK_WAIT):
                    await _back(xs, schedule, domids, name, before.get(fault.id), republish)
            if cluster is not None and xenstored:
                await _restart_xenstored(cluster, xs)
            if fault.kind in LINK_BREAKING:
                injection.injector_for(fault).stop(fault)  # heal now; the window lasts until
                with trio.move_on_after(BACK_WAIT):  # the devices across it reconnected
                    await _until_reconnected(xs, _link_state_paths(schedule, domids, fault.target))
            injection.stop(fault)
        finally:
            if restarts or xenstored:
                recovering -= 1
                if not recovering:
                    recovered.set()

    async with trio.open_nursery() as nursery:
        for offset, action, fault in schedule.events():
            await trio.sleep_until(origin + offset)
            name = fault.target.removeprefix("domain:")
            restarts = fault.kind in RESTARTING and name in domids
            hotplug = hotplugs is not None and hotplugs.handles(fault)
            xenstored = fault.kind == XENSTORED_KILL and cluster is not None
            if action == "start":
                await recovered.wait()
                if cluster is not None and xenstored:
                    cluster_mod.expect_xenstored_exit(cluster)  # before the signal
                if restarts:
                    before[fault.id] = await _ready_value(xs, domids[name])
                injection.start(fault)
                if hotplugs is not None and hotplug:
                    with trio.move_on_after(BACK_WAIT):
                        await hotplugs.detach(fault)
                continue
            if restarts or xenstored:
                if not recovering:
                    recovered = trio.Event()
                recovering += 1
            nursery.start_soon(heal, fault, name, restarts, hotplug, xenstored)


async def _restart_xenstored(cluster: cluster_mod.Cluster, xs: XenstoreClient) -> None:
    """Start the killed xenstored again and wait (bounded) until it answers our client."""
    try:
        await cluster_mod.restart_xenstored(cluster)
    except XenpvError as exc:  # the cluster's death watcher ends the run with the reason
        log.error("cannot restart xenstored", error=str(exc))
        return
    with trio.move_on_after(BACK_WAIT), contextlib.suppress(XsError, XenstoreConnectionError):
        await xs.try_read("/local")


def _link_state_paths(schedule: Schedule, domids: dict[str, int], target: str) -> list[str]:
    """Both ends' state nodes of every device whose frontend and backend a link fault's
    target (`link:A-B` or `domain:X`) separates."""
    paths = []
    for device in schedule.topology.devices:
        ends = {device.guest, device.backend}
        if target.startswith("domain:"):
            hit = target.removeprefix("domain:") in ends
        else:
            hit = any(f"link:{a}-{b}" == target for a in ends for b in ends if a != b)
        if hit:
            fe, be = domids[device.guest], domids[device.backend]
            paths.append(f"{domain_path(fe)}/device/{device.cls}/{device.devid}/state")
            paths.append(f"{domain_path(be)}/backend/{device.cls}/{fe}/{device.devid}/state")
    return paths


async def _until_reconnected(xs: XenstoreClient, paths: list[str]) -> None:
    """Until every node of `paths` reads Connected, and again `LINK_SETTLE` later (a link
    that died just before the heal takes a moment to show in the states)."""
    while True:
        await trio.sleep(LINK_SETTLE)
        for path in paths:
            await _until_connected(xs, path)
        await trio.sleep(LINK_SETTLE)
        connected = [await _is_connected(xs, path) for path in paths]
        if all(connected):
            return


async def _is_connected(xs: XenstoreClient, path: str) -> bool:
    with contextlib.suppress(XsError, XenstoreConnectionError):
        raw = await xs.try_read(path)
        return raw is not None and raw.strip() == b"4"
    return False


def save_json(result: RunResult) -> str:
    return json.dumps(result.to_json(), sort_keys=True)
