"""The fault agent: the part of a fault run that lives in each domain process.

`run_domain` starts one per domain. It watches the domain's control node
(`xenpv.faults.control`, `/tool/xenpv/faults/<domid>`) and, while a run is on:

- applies and heals the faults the runner lists there, through local seams: `link.*` on
  the domain's `LinkFaults` (`Domain.set_link_faults`, installed on first use), `storage.*`
  on the `FaultyStorage` the agent puts in front of every disk this domain serves
  (`open_storage`, the blkback hook), `event.*` on the port table's `EventFaults` and
  `grant.*` on the grant mapper's `GrantFaults` (both None, i.e. free, unless a fault of
  that family is active); `ring.*` on the rings' hostile-peer seam (`xenpv.faults.hostile`,
  `xenpv.abi.ring.set_tamper`, likewise None unless a ring fault is active);
- runs this guest's part of the plan's workloads (`xenpv.faults.guest`), recording into
  `<history_dir>/<domain>.jsonl`;
- in the `probe` phase, runs probe I/Os on each of its devices until one succeeds; in the
  `stop` phase, stops the workloads, closes its history file and writes
  `/local/domain/<id>/xenpv/faults/stopped` (the runner waits for it before merging).

Which domain applies a fault is the runner's choice (`xenpv.faults.runner.recipients`): a
device's storage faults go to its backend, its event faults to its frontend (notifications it
sends), its grant faults to its backend (the domain mapping and copying the guest's grants).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.abi.ring import set_tamper
from xenpv.faults import selfprocess
from xenpv.faults.control import (
    Control,
    Hits,
    ProcessLog,
    RunConfig,
    control_path,
    history_file,
    param,
)
from xenpv.faults.guest import DomainRuntime
from xenpv.faults.hostile import HostileRings
from xenpv.faults.link import LinkInjector
from xenpv.faults.schedule import Schedule, ScheduledFault, stream
from xenpv.faults.storage import FaultyStorage
from xenpv.hv.errors import PeerGone
from xenpv.hv.messages import Update
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreConnectionError
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from backends.storage.base import Storage
    from xenpv.hv.evtchn import EventChannel

log = structlog.get_logger()

STOPPED = "xenpv/faults/stopped"
READY = "xenpv/faults/ready"
FAULTS_ENV = "XENPV_FAULTS"  # "1": wrap every disk a domain serves (storage faults possible)
# Test-only: "drop-writes" makes every wrapped disk acknowledge writes without keeping them,
# "corrupt" flips a byte of every write: a broken backend the block checker must catch.
BROKEN_ENV = "XENPV_FAULTS_BROKEN_STORAGE"
REVOKE_KIND = "grant.revoke-while-mapped"  # applied by the guest: the granter
STORM_TICK = 0.01  # seconds between bursts of a storm or spurious notifications
STORM_MAX_PER_TICK = 200  # keep a storm from starving the domain's own work entirely
_OK = 0


@dataclass
class _PeerInjector:
    """The faults of one family active on this domain, each limited to work with one peer
    domain and to one device's tasks (None: any)."""

    seed: int
    active: dict[str, tuple[Hits, int | None, str | None]] = field(default_factory=dict)

    def start(self, fault: ScheduledFault, peer: int | None, device: str | None) -> None:
        hits = Hits(fault, stream(self.seed, f"inject/{fault.id}"))
        self.active[fault.id] = (hits, peer, device)

    def stop(self, fault: ScheduledFault) -> None:
        self.active.pop(fault.id, None)

    def hitting(self, remote: int) -> Iterator[Hits]:
        """The active faults that apply to work with domain `remote` by the running task."""
        for hits, peer, device in self.active.values():
            if peer is not None and remote != peer:
                continue
            if device is not None and current_device() != device:
                continue
            yield hits


@dataclass
class EventInjector(_PeerInjector):
    """`event.*` on this domain's outgoing notifications (the port table's seam); `peer`
    None means every channel, else only channels to that domain."""

    spawn: Callable[..., None] = field(kw_only=True)

    def on_event(self, channel: EventChannel, send: Callable[[], None]) -> bool:
        for hits in self.hitting(channel.remote_domid):
            kind = hits.fault.kind
            if kind not in ("event.delay", "event.drop", "event.duplicate"):
                continue
            if not hits.fires():
                continue
            if kind == "event.drop":
                return True
            if kind == "event.duplicate":
                send()
                send()
                return True
            self.spawn(_later, float(param(hits.fault, "delay", 0.01)), send)
            return True
        return False


def wants_storage_faults() -> bool:
    return os.environ.get(FAULTS_ENV) == "1"


class CorruptingStorage:
    """Test-only (BROKEN_ENV=corrupt): flips one byte of every write on its way down."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write(self, offset: int, buffers: Sequence[Any]) -> None:
        data = bytearray(b"".join(bytes(b) for b in buffers))
        if len(data) > 100:
            data[100] ^= 0xFF
        await self.inner.write(offset, [bytes(data)])


def _next_incarnation(path: Path) -> int:
    """0 the first time a domain's agent begins a run, then 1, 2... (after restarts)."""
    try:
        n = int(path.read_text()) + 1
    except (OSError, ValueError):
        n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(n))
    return n


def current_device() -> str | None:
    """The device whose task is running (`DeviceTasks` binds it for its drivers' tasks and
    those they spawn): device-targeted event and grant faults hit only that device's work,
    not the other devices the same two domains share."""
    device = structlog.contextvars.get_contextvars().get("device")
    return device if isinstance(device, str) else None


async def _guarded(fn: Callable[..., Any], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception as exc:
        log.error("fault agent task failed", task=getattr(fn, "__name__", "?"), error=repr(exc))


async def _later(delay: float, send: Callable[[], None]) -> None:
    await trio.sleep(delay)
    with contextlib.suppress(Exception):  # the channel or link may be gone by now
        send()


@dataclass
class GrantInjector(_PeerInjector):
    """`grant.map-fail` and `grant.batch-element-fail` on this domain's grant operations
    (the grant mapper's seam); `peer` None: on every domain's grants."""

    def fail(self, op: str, remote: int, count: int) -> Sequence[int] | None:
        from xenpv.hv.gntst import GNTST

        for hits in self.hitting(remote):
            f = hits.fault
            status = int(GNTST[str(param(f, "status", "GNTST_general_error"))])
            if f.kind == "grant.map-fail":
                if hits.fires():
                    return [status] * count
            elif f.kind == "grant.batch-element-fail":
                k = int(param(f, "k", 0))
                if k < count and hits.fires():
                    return [status if i == k else _OK for i in range(count)]
        return None


class FaultAgent:
    """See the module doc. `open_storage` is the block backend's per-device storage hook."""

    def __init__(self, rt: DomainRuntime) -> None:
        self.rt = rt
        self.disks: dict[tuple[int, int], FaultyStorage] = {}  # (frontend domid, devid)
        self.active: dict[str, ScheduledFault] = {}
        self.config: RunConfig | None = None
        self.schedule: Schedule | None = None
        self.history: ProcessLog | None = None
        self.phase = "idle"
        self._link: LinkInjector | None = None
        self._events: EventInjector | None = None
        self._grants: GrantInjector | None = None
        self._revoked: dict[str, list[int]] = {}  # fault id -> grefs it revoked (granter)
        self._rings: HostileRings | None = None
        self._storms: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._workloads: trio.CancelScope | None = None
        self._go = trio.Event()  # every guest is ready: operations begin
        self._drain = trio.Event()  # senders stop; receivers take what is in flight

    # -- the block backend's hook -----------------------------------------------------------

    def open_storage(self, device: DeviceId, inner: Storage) -> Storage:
        """Put a `FaultyStorage` in front of a disk this domain serves."""
        broken = os.environ.get(BROKEN_ENV, "")
        if broken == "corrupt":
            inner = CorruptingStorage(inner)
        disk = FaultyStorage(inner)
        if broken == "drop-writes":
            disk.start(
                ScheduledFault("broken", -1, "storage.drop-writes", "", 0, 0, None, None, ())
            )
        self.disks[(device.frontend_domid, device.devid)] = disk
        for fault in self.active.values():
            if fault.kind.startswith("storage.") and self._disk_of(fault) is disk:
                self._storage_start(disk, fault)
        return disk

    # -- the control node -------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the control node for the domain's life. A failure here is logged, never the
        domain's: faults are healed and the agent stops."""
        try:
            await self._follow()
        except Exception as exc:
            log.error("fault agent failed", error=repr(exc))
        finally:
            self.heal_all()  # synchronous: nothing can interrupt it
            if self.history is not None:
                self.history.close()

    async def _follow(self) -> None:
        path = control_path(self.rt.info.domid)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with self.rt.xs.watch(path) as events:
                async for _event in events:
                    try:
                        raw = await self.rt.xs.try_read(path)
                    except (XsError, XenstoreConnectionError) as exc:
                        # EACCES before any run: /tool/xenpv/faults does not exist yet.
                        if self.config is not None:
                            log.warning("cannot read the fault control node", error=str(exc))
                        continue
                    await self.apply(Control.decode(raw))

    async def apply(self, control: Control) -> None:
        if control.run is not None and self.config is None:
            await self._begin(control.run)
        wanted = {f.id: f for f in control.faults} if control.run is not None else {}
        for fault_id in [i for i in self.active if i not in wanted]:
            self._stop(self.active.pop(fault_id))
        for fault_id, fault in wanted.items():
            if fault_id not in self.active:
                self.active[fault_id] = fault
                try:
                    self._start(fault)
                except Exception as exc:  # a bad fault never takes the domain down
                    log.error("cannot inject fault", fault=fault_id, error=repr(exc))
        if control.run is None:
            if self.config is not None and self.phase != "stopped":
                await self._finish()
            return
        if control.phase != "setup":
            self._go.set()
        if control.phase != self.phase:
            self.phase = control.phase
            if control.phase == "probe":
                self._spawn(self._probe)
            elif control.phase == "drain":
                self._drain.set()
            elif control.phase == "stop":
                await self._finish()

    async def _begin(self, config: RunConfig) -> None:
        from xenpv.faults.guest import run_workloads

        self.config = config
        self.schedule = Schedule.from_json(config.schedule)
        path = history_file(config.history_dir, self.rt.info.name)
        incarnation = _next_incarnation(path.with_suffix(".incarnation"))
        self.history = ProcessLog(path, config.epoch)
        self.phase = "run"
        scope = trio.CancelScope()
        self._workloads = scope

        async def workloads(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                assert self.schedule is not None and self.history is not None
                try:
                    await run_workloads(
                        self.rt,
                        self.schedule,
                        config,
                        self.history,
                        self._go,
                        self._drain,
                        incarnation,
                        task_status=task_status,
                    )
                except Exception as exc:  # the faults go on being applied and healed
                    log.error("fault workloads failed", error=repr(exc))

        assert self._nursery is not None
        await self._nursery.start(workloads)
        with contextlib.suppress(XsError, XenstoreConnectionError):
            await self.rt.write_own(READY, str(incarnation))
        for key, disk in self.disks.items():
            if self._wants_cache(key):
                disk.write_cache = True

    def _wants_cache(self, key: tuple[int, int]) -> bool:
        """A disk with a power cut scheduled runs with a volatile write cache all along."""
        assert self.schedule is not None and self.config is not None
        for fault in self.schedule.faults:
            if fault.kind == "storage.power-cut":
                device = self._device_key(fault.target)
                if device == key:
                    return True
        return False

    async def _probe(self) -> None:
        from xenpv.faults.guest import probe_devices

        assert self.schedule is not None and self.history is not None and self.config
        await probe_devices(self.rt, self.schedule, self.config, self.history)

    async def _finish(self) -> None:
        self.phase = "stopped"
        if self._workloads is not None:
            self._workloads.cancel()
        self.heal_all()
        if self.history is not None:
            self.history.close()
        with contextlib.suppress(XsError, XenstoreConnectionError):
            await self.rt.write_own(STOPPED, json.dumps({"lines": self._lines()}))

    def _lines(self) -> int:
        return 0 if self.history is None else self.history.lines

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(_guarded, fn, *args)

    # -- applying and healing ---------------------------------------------------------------

    def heal_all(self) -> None:
        for fault in reversed(list(self.active.values())):
            with contextlib.suppress(Exception):
                self._stop(fault)
        self.active.clear()

    def _device_key(self, target: str) -> tuple[int, int] | None:
        """(frontend domid, devid) of a device or queue target."""
        assert self.schedule is not None and self.config is not None
        if target.startswith("queue:"):
            target = "device:" + ":".join(target.split(":")[1:4])
        if not target.startswith("device:"):
            return None
        device = self.schedule.topology.device(target)
        return (self.config.domids[device.guest], device.devid)

    def _disk_of(self, fault: ScheduledFault) -> FaultyStorage | None:
        key = self._device_key(fault.target)
        return None if key is None else self.disks.get(key)

    def _device_str(self, fault: ScheduledFault) -> str | None:
        """`str(DeviceId)` of a device (or queue) target, e.g. `vbd/2/51712`; None else."""
        assert self.schedule is not None
        key = self._device_key(fault.target)
        if key is None:
            return None
        cls = fault.target.split(":")[2]
        return f"{cls}/{key[0]}/{key[1]}"

    def _peer(self, fault: ScheduledFault, *, from_backend: bool) -> int | None:
        """The remote domain a device fault is about (None: a domain target, every peer)."""
        assert self.schedule is not None and self.config is not None
        target = fault.target
        if target.startswith("queue:"):
            target = "device:" + ":".join(target.split(":")[1:4])
        if not target.startswith("device:"):
            return None
        device = self.schedule.topology.device(target)
        return self.config.domids[device.guest if from_backend else device.backend]

    def _start(self, fault: ScheduledFault) -> None:
        assert self.config is not None
        family = fault.kind.split(".")[0]
        dom = self.rt.dom
        log.info("fault applied", fault=fault.id, kind=fault.kind, target=fault.target)
        if family == "link":
            if self._link is None:
                self._link = LinkInjector(self.config.domids, self.config.seed)
                dom.set_link_faults(self._link)
            self._link.start(fault)
        elif family == "storage":
            disk = self._disk_of(fault)
            if disk is not None:
                self._storage_start(disk, fault)
        elif family == "event":
            if self._events is None:
                self._events = EventInjector(self.config.seed, spawn=self._spawn)
            peer = self._peer(fault, from_backend=False)
            self._events.start(fault, peer, self._device_str(fault))
            dom.ports.faults = self._events
            if fault.kind in ("event.spurious", "event.storm"):
                scope = trio.CancelScope()
                self._storms[fault.id] = scope
                self._spawn(self._storm, fault, peer, scope)
        elif fault.kind == REVOKE_KIND:
            self._revoked[fault.id] = []
            self._spawn(self._revoke, fault)
        elif family == "grant":
            if self._grants is None:
                self._grants = GrantInjector(self.config.seed)
            self._grants.start(fault, self._peer(fault, from_backend=True), self._device_str(fault))
            dom.mapper.faults = self._grants
        elif family == "ring":
            if self._rings is None:
                self._rings = HostileRings(self.config.seed, current_device)
            self._rings.start(fault, self._device_str(fault))
            set_tamper(self._rings)
        elif family == "process":  # only an attached run lists these here (selfprocess)
            self._apply_to_self(fault)

    def _apply_to_self(self, fault: ScheduledFault) -> None:
        assert self.config is not None
        selfprocess.apply_to_self(
            fault, selfprocess.applied_file(self.config.history_dir, self.rt.info.name)
        )

    async def _revoke(self, fault: ScheduledFault) -> None:
        """grant.revoke-while-mapped, in the guest (the granter): end by force every data
        grant the target's backend maps now. Ring grants are spared (a revoked ring only
        halts the device, which the plan would then have to expect): they are the
        `*ring-ref*` keys of this guest's device directories."""
        assert self.config is not None and self.schedule is not None
        dom = self.rt.dom
        name = self.rt.info.name
        backends = {
            self.config.domids[d.backend]
            for d in self.schedule.topology.devices
            if d.guest == name and (fault.target in (f"domain:{name}", d.id))
        }
        rings = await self._ring_refs()
        revoked = self._revoked.get(fault.id)
        if revoked is None:
            return  # healed meanwhile
        for gref in dom.grants.mapped:
            if gref in rings or dom.grants.entry(gref).domid not in backends:
                continue
            if dom.revoke_access(gref):
                revoked.append(gref)
        log.info("grants revoked while mapped", fault=fault.id, grefs=len(revoked))

    async def _ring_refs(self) -> set[int]:
        xs, base = self.rt.xs, f"{self.rt.base}/device"
        refs: set[int] = set()

        async def scan(path: str, depth: int) -> None:
            for child in await xs.try_directory(path):
                where = f"{path}/{child}"
                if "ring-ref" in child:
                    raw = await xs.try_read(where)
                    if raw is not None and raw.strip().isdigit():
                        refs.add(int(raw))
                elif depth:
                    await scan(where, depth - 1)

        await scan(base, 3)  # device/<class>/<devid>/[queue-N/]ring-ref*
        return refs

    def _storage_start(self, disk: FaultyStorage, fault: ScheduledFault) -> None:
        disk.start(fault)

    def _stop(self, fault: ScheduledFault) -> None:
        family = fault.kind.split(".")[0]
        log.info("fault healed", fault=fault.id, kind=fault.kind, target=fault.target)
        if family == "link" and self._link is not None:
            self._link.stop(fault)
            for peer in self._link.holding_for():
                # Held (reordered) messages leave with the next one: send an empty UPDATE,
                # which changes nothing, so an idle direction does not keep them for good.
                link = self.rt.dom.link_to(peer)
                if link is not None:
                    with contextlib.suppress(PeerGone):
                        link.send(Update([]))
        elif family == "storage":
            disk = self._disk_of(fault)
            if disk is not None:
                disk.stop(fault)
        elif family == "event" and self._events is not None:
            self._events.stop(fault)
            scope = self._storms.pop(fault.id, None)
            if scope is not None:
                scope.cancel()
            if not self._events.active:
                self.rt.dom.ports.faults = None
        elif fault.kind == REVOKE_KIND:
            for gref in self._revoked.pop(fault.id, []):  # granted again, same references
                self.rt.dom.grants.restore(gref)
        elif family == "grant" and self._grants is not None:
            self._grants.stop(fault)
            if not self._grants.active:
                self.rt.dom.mapper.faults = None
        elif family == "ring" and self._rings is not None:
            self._rings.stop(fault.id)
            if not self._rings.active:
                set_tamper(None)

    async def _storm(
        self, fault: ScheduledFault, peer: int | None, scope: trio.CancelScope
    ) -> None:
        """Notifications with no work behind them, at the fault's rate (capped per tick)."""
        rate = float(param(fault, "rate", 100.0))
        owed = 0.0
        with scope:
            while True:
                await trio.sleep(STORM_TICK)
                owed = min(owed + rate * STORM_TICK, STORM_MAX_PER_TICK)
                assert self.config is not None
                peers = [peer] if peer is not None else list(self.config.domids.values())
                channels = [c for p in peers for c in self.rt.dom.ports.channels_to(p)]
                while owed >= 1:
                    owed -= 1
                    for channel in channels:
                        with contextlib.suppress(Exception):
                            channel.notify()
