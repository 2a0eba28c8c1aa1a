"""One domain's runtime: connect to xenstore, open the domain, serve and attach its devices.

    async with connect("tcp:127.0.0.1:PORT", key=key) as xs:
        await run_domain(xs, key, transport="auto")     # until cancelled or destroyed

`run_domain` is an ordinary coroutine, so one trio run may host several domains (call it N
times in a nursery, each with its own xenstore client); `xenpv domain` runs one.

What it does, in order:
1. reads what the toolstack published under `/tool/xenpv/domain/<id>/` (page size, memory,
   link endpoint) and the domain's name, and runs `open_domain` with a `XenstoreDirectory`
   (peers are found through xenstore) following `@releaseDomain` for its peers;
2. backend role: watches `/local/domain/<id>/backend/{vbd,vif}` and runs
   `backends.blkback.serve` / `backends.netback.serve` for every device directory found there
   (including those that existed before a restart); all vifs of this domain share one
   `LiveSwitch`. A device's task is cancelled when its directory disappears;
3. guest role: watches `/local/domain/<id>/device/{vbd,vif}` and keeps
   `frontends.blkfront.attach` / `frontends.netfront.attach` open for every device, in
   `DomainRuntime.blk` / `.net` (the workloads' `WorkloadContext`), and pumps every vif's
   received frames into the context's frame sinks;
4. starts its fault agent (`xenpv.faults.agent`: idle, one watch, until `xenpv faults run`
   publishes the domain's control node; with XENPV_FAULTS=1 in the environment, which the
   runner sets, it also wraps each served disk for storage faults) and
   runs its workloads (`xenpv.runtime.workload`; by default the demo's: the echo responder
   and the self-test, whose rounds the launcher asks for under `xenpv/control/selftest`,
   results in `xenpv/checks/<name>`), then writes `/local/domain/<id>/xenpv/ready` = its pid
   once all the above is watching (the launcher watches that key: readiness without sleeps);
5. returns when the toolstack destroys the domain (its `/local/domain/<id>/domid` node goes)
   or on `DomainRuntime.stop()` (SIGTERM in `xenpv domain`): devices are closed first, while
   the domain's links still work, so backends can unmap and frontends see Closed.

A domain does both roles at once when it has both kinds of directories: the role is a property
of the devices, not of the process.

Device isolation, as Linux's `xenbus_dev_fatal`: whatever a device's task raises (a xenstore
error such as a quota refusal, a bad frontend, a storage error, a driver bug) ends that device
only. Its reason is logged, written to `error/<device path>/error` under this domain (where
Linux writes it, and where the launcher looks) and to `xenpv/device-errors/<cls>-<fe>-<devid>`,
and this end's `state` switches to Closing; every other device and the process go on. The
domain's own watches (destruction, device directories) are registered before any device
starts, so a device that exhausts a quota cannot take them. Drivers are imported lazily: a
missing one is reported as "driver not available".
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.faults.agent import FaultAgent, wants_storage_faults
from xenpv.hv import Domain
from xenpv.identity import TOOL_DOMAIN_ROOT, DomainKey, link_path
from xenpv.runtime.lifecycle import open_published_domain
from xenpv.runtime.nbd_export import NbdExports
from xenpv.runtime.selftest import CHECKS as CHECKS  # re-exported: the launcher's keys
from xenpv.runtime.selftest import CONTROL_SELFTEST as CONTROL_SELFTEST
from xenpv.runtime.selftest import SELFTEST_DONE as SELFTEST_DONE
from xenpv.runtime.selftest import demo_workloads
from xenpv.runtime.workload import Workload, WorkloadContext, pump_frames
from xenpv.xenbus.core import DEVICE_CLASSES, Closing, DeviceClass, DeviceId, domain_path
from xenpv.xenbus.handshake import publish
from xenpv.xenbus.keys import XENPV_INSTANCE
from xenpv.xenstore.client import UNREADABLE, XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from backends.switch import LiveSwitch
    from frontends.blkfront import Blkfront
    from frontends.netfront import Netfront

log = structlog.get_logger()

XENPV_DIR = "xenpv"
READY = "xenpv/ready"
DEVICE_ERRORS = "xenpv/device-errors"
DESTROY_READ_TIMEOUT = 2.0
STOP_DEVICES_TIMEOUT = 6.0  # seconds devices may take to close on a graceful stop
FAILURE_REPORT_TIMEOUT = 2.0  # seconds to record a failed device (xenstored may be gone)


class DomainProcessError(XenpvError):
    """The domain cannot run (not created by the toolstack, bad published keys...)."""


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the toolstack published about a domain."""

    domid: int
    name: str
    page_size: int
    memory: int
    endpoint: str
    max_maps: int | None = None  # maptrack entries the toolstack allows (None: the default)
    max_ports: int | None = None  # event channel ports the toolstack allows (None: default)


async def read_domain_info(xs: XenstoreClient, domid: int) -> DomainInfo:
    tool = f"{TOOL_DOMAIN_ROOT}/{domid}"
    values: dict[str, str] = {}
    for key, path in (
        ("page-size", f"{tool}/page-size"),
        ("memory", f"{tool}/memory"),
        ("link", link_path(domid)),
        ("name", f"{domain_path(domid)}/name"),
    ):
        raw = await xs.try_read(path)
        if raw is None:
            raise DomainProcessError(
                f"domain {domid}: {path} is missing (was the domain created by the toolstack?)"
            )
        values[key] = raw.decode("utf-8", "replace")
    try:
        page_size, memory = int(values["page-size"]), int(values["memory"])
        raw = await xs.try_read(f"{tool}/max-maptrack")
        max_maps = int(raw) if raw is not None else None
        raw = await xs.try_read(f"{tool}/max-event-channels")
        max_ports = int(raw) if raw is not None else None
    except ValueError:
        raise DomainProcessError(
            f"domain {domid}: malformed page-size, memory, max-maptrack or max-event-channels"
        ) from None
    return DomainInfo(domid, values["name"], page_size, memory, values["link"], max_maps, max_ports)


def device_error_key(device: DeviceId) -> str:
    return f"{DEVICE_ERRORS}/{device.cls}-{device.frontend_domid}-{device.devid}"


def fatal_error_path(domain: str, own: str) -> str:
    """Where `xenbus_dev_fatal` records a device's failure: `<domain>/error/<own path
    relative to the domain>/error`."""
    return f"{domain}/error/{own.removeprefix(domain + '/')}/error"


@dataclass(eq=False)
class DomainRuntime:
    """A running domain: its hypervisor slice, xenstore client, and what its workloads see
    (`ctx`: the attached frontends and the vifs' frame sinks)."""

    dom: Domain
    xs: XenstoreClient
    info: DomainInfo
    ctx: WorkloadContext
    switch: LiveSwitch[Any] | None = None  # the backend's switch, created with the first vif
    # The fault agent's storage hook (`xenpv.faults.agent`): wraps each disk served here.
    wrap_storage: Callable[[DeviceId, Any], Any] | None = None
    stopping: trio.Event = field(default_factory=trio.Event)
    destroyed: bool = False
    # ("backend" | "device", cls) → that watch's device tasks (hot-unplug tests wait on them)
    device_tasks: dict[tuple[str, DeviceClass], DeviceTasks] = field(default_factory=dict)

    @property
    def blk(self) -> dict[DeviceId, Blkfront]:
        return self.ctx.blk

    @property
    def net(self) -> dict[DeviceId, Netfront]:
        return self.ctx.net

    def stop(self) -> None:
        """Ask `run_domain` to close every device, then the domain, and return."""
        self.stopping.set()

    @property
    def base(self) -> str:
        return domain_path(self.info.domid)

    def notify(self) -> None:
        self.ctx.devices_changed()

    async def write_own(self, key: str, value: str) -> None:
        await self.xs.write(f"{self.base}/{key}", value)

    async def device_failed(self, device: DeviceId, message: str) -> None:
        """`xenbus_dev_fatal` for one of this domain's ends of `device` (see module doc)."""
        log.error("device failed", device=str(device), error=message)
        own = device.backend if device.backend_domid == self.info.domid else device.frontend
        with contextlib.suppress(XsError, XenpvError, XenstoreConnectionError):
            await self.xs.write(fatal_error_path(self.base, own), message)
        with contextlib.suppress(XsError, XenpvError, XenstoreConnectionError):
            await self.write_own(device_error_key(device), message)
        with contextlib.suppress(XsError, XenpvError, XenstoreConnectionError):
            await publish(self.xs, own, {}, state=Closing)  # not if the device was removed


class DeviceTasks:
    """One task per device, started when its directory appears, cancelled when it goes."""

    def __init__(
        self,
        nursery: trio.Nursery,
        runner: Callable[[DeviceId], Awaitable[None]],
        on_failure: Callable[[DeviceId, str], Awaitable[None]] | None = None,
    ) -> None:
        self._nursery = nursery
        self._runner = runner
        self._on_failure = on_failure
        self._scopes: dict[DeviceId, trio.CancelScope] = {}
        self._instances: dict[DeviceId, str | None] = {}
        self.running = 0
        self.ended = trio.Event()

    @property
    def devices(self) -> set[DeviceId]:
        return set(self._scopes)

    def sync(self, present: Mapping[DeviceId, str | None]) -> None:
        """Start a task for every new device, cancel those of devices gone. `present` maps
        each device to its instance token: a device detached and attached again under the
        same id between two scans (watches coalesce) has a new token, and a new task."""
        for device, instance in self._instances.items():
            if device in present and present[device] != instance:
                self._scopes.pop(device).cancel()
        for device in set(self._scopes) - set(present):
            self._scopes.pop(device).cancel()
        self._instances = {d: i for d, i in self._instances.items() if d in self._scopes}
        for device in set(present) - set(self._scopes):
            scope = trio.CancelScope()
            self._scopes[device] = scope
            self._instances[device] = present[device]
            self._nursery.start_soon(self._run, device, scope)

    async def _run(self, device: DeviceId, scope: trio.CancelScope) -> None:
        self.running += 1
        try:
            with scope, structlog.contextvars.bound_contextvars(device=str(device)):
                await self._runner(device)
        except Exception as exc:
            # What a driver raised (also while being cancelled: the cancel scope strips
            # Cancelled from the group, the rest lands here): this device is done, the
            # others go on.
            log.error("device task failed", device=str(device), error=repr(exc))
            if self._on_failure is not None and not scope.cancel_called:
                with trio.CancelScope(shield=True), trio.move_on_after(FAILURE_REPORT_TIMEOUT):
                    await self._on_failure(device, describe_failure(exc))
        except BaseExceptionGroup as group:
            # Cancelled by an enclosing scope (the domain stopping) while a driver raised:
            # report the driver's errors, let only the cancellation through.
            cancelled, others = group.split(trio.Cancelled)
            if others is not None:
                log.error("device task failed", device=str(device), error=repr(others))
            if cancelled is not None:
                raise cancelled from None
        finally:
            self.running -= 1
            self.ended.set()
            self.ended = trio.Event()
        # A device whose task ended by itself stays registered until its directory goes,
        # so that a failing device is not restarted in a loop on every watch event.


def describe_failure(exc: BaseException) -> str:
    """One line for a device's failure: the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _instance(xs: XenstoreClient, directory: str) -> str | None:
    raw = await xs.try_read(f"{directory}/{XENPV_INSTANCE}")
    return None if raw is None else raw.decode("ascii", "replace")


async def scan_backend(
    xs: XenstoreClient, domid: int, cls: DeviceClass
) -> dict[DeviceId, str | None]:
    """The devices this domain serves, each with its instance token."""
    base = f"{domain_path(domid)}/backend/{cls}"
    found: dict[DeviceId, str | None] = {}
    for fe in await xs.try_directory(base, ignore=UNREADABLE):
        for devid in await xs.try_directory(f"{base}/{fe}", ignore=UNREADABLE):
            if fe.isdigit() and devid.isdigit():
                device = DeviceId(cls, int(fe), domid, int(devid))
                found[device] = await _instance(xs, device.backend)
    return found


async def scan_frontend(
    xs: XenstoreClient, domid: int, cls: DeviceClass
) -> dict[DeviceId, str | None]:
    """The devices this domain is a guest of, each with its instance token."""
    base = f"{domain_path(domid)}/device/{cls}"
    found: dict[DeviceId, str | None] = {}
    for devid in await xs.try_directory(base, ignore=UNREADABLE):
        if not devid.isdigit():
            continue
        raw = await xs.try_read(f"{base}/{devid}/backend-id")
        if raw is not None and raw.strip().isdigit():
            device = DeviceId(cls, domid, int(raw), int(devid))
            found[device] = await _instance(xs, device.frontend)
    return found


async def _with_driver(
    rt: DomainRuntime,
    device: DeviceId,
    modules: tuple[str, str],
    use: Callable[[Any], Awaitable[None]],
) -> None:
    """`use` the driver module of `device` (`modules`: the vbd one, the vif one). A module
    that cannot be imported, or an exception out of `use`, fails this device alone."""
    name = modules[0] if device.cls == "vbd" else modules[1]
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        log.error("driver not available", module=name, error=str(exc))
        await rt.device_failed(device, "driver not available")
        return
    try:
        await use(module)
    except Exception as exc:  # one device never kills the process
        await rt.device_failed(device, describe_failure(exc))


async def _serve_backend(rt: DomainRuntime, device: DeviceId) -> None:
    async def serve(module: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_stop, rt, nursery.cancel_scope)
            if device.cls == "vbd":
                if rt.wrap_storage is None:
                    await module.serve(rt.dom, rt.xs, device)
                else:
                    await module.serve(rt.dom, rt.xs, device, open_storage=_wrapped(rt, device))
            else:
                if rt.switch is None:
                    from backends.switch import LiveSwitch

                    rt.switch = LiveSwitch()
                await module.serve(rt.dom, rt.xs, device, rt.switch)
            log.info("backend device removed")
            nursery.cancel_scope.cancel()

    await _with_driver(rt, device, ("backends.blkback", "backends.netback"), serve)


def _wrapped(rt: DomainRuntime, device: DeviceId) -> Callable[[Any], Any]:
    from backends.blkback.device import open_storage_from

    wrap = rt.wrap_storage
    assert wrap is not None

    def open_storage(config: Any) -> Any:
        return wrap(device, open_storage_from(config))

    return open_storage


async def _attach_frontend(rt: DomainRuntime, device: DeviceId) -> None:
    async def run(module: Any) -> None:
        async with module.attach(rt.dom, rt.xs, device) as front:
            # On stop, leave the block normally (not by cancellation): the driver's
            # handshake task must still run while it closes the device through xenbus.
            if device.cls == "vbd":
                rt.blk[device] = front
                rt.notify()
                try:
                    await rt.stopping.wait()
                finally:
                    rt.blk.pop(device, None)
                    rt.notify()
            else:
                rt.net[device] = front
                rt.notify()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_cancel_on_stop, rt, nursery.cancel_scope)
                        await pump_frames(front, rt.ctx.frames)
                finally:
                    rt.net.pop(device, None)
                    rt.notify()

    await _with_driver(rt, device, ("frontends.blkfront", "frontends.netfront"), run)


async def _cancel_on_stop(rt: DomainRuntime, scope: trio.CancelScope) -> None:
    await rt.stopping.wait()
    scope.cancel()


async def _watch_devices(
    rt: DomainRuntime,
    subtree: str,
    cls: DeviceClass,
    tasks: DeviceTasks,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    base = f"{rt.base}/{subtree}/{cls}"
    depth = base.count("/") + (2 if subtree == "backend" else 1)
    scan = scan_backend if subtree == "backend" else scan_frontend
    async with rt.xs.watch(base) as events:
        started = False
        async for path, _token in events:
            # Rescan when a device directory (or a parent) appears or goes, not on every
            # key its drivers write below it; a frontend's backend-id is one level deeper.
            if started and path.count("/") > depth and not path.endswith("/backend-id"):
                continue
            try:
                tasks.sync(await scan(rt.xs, rt.info.domid, cls))
            except XsError as exc:  # e.g. EACCES while the toolstack removes this domain
                log.warning("cannot scan devices", path=base, error=str(exc))
                if not started:
                    raise
                continue
            if not started:
                started = True
                task_status.started()


async def _wait_destroyed(
    xs: XenstoreClient,
    domid: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Return once the toolstack removed the domain. `destroy_domain` removes the nodes, then
    RELEASEs the domain, which makes xenstored drop this client's connection and refuse it
    back; so a read after the removal event may never be answered: no answer within
    DESTROY_READ_TIMEOUT also means destroyed (after a xenstored restart the re-registered
    watch's event comes once the client is back, and its read answers at once)."""
    path = f"{domain_path(domid)}/domid"
    async with xs.watch(path) as events:
        task_status.started()
        async for _event in events:
            with trio.move_on_after(DESTROY_READ_TIMEOUT):
                try:
                    if await xs.try_read(path) is None:
                        return
                except (XsError, XenstoreConnectionError):
                    return  # EACCES: /local/domain/<id> itself is gone
                continue
            return


async def _run_workload(rt: DomainRuntime, workload: Workload) -> None:
    """One workload, for as long as it runs: its failure is logged, never the domain's."""
    try:
        with structlog.contextvars.bound_contextvars(workload=workload.name):
            await workload.run(rt.ctx)
    except Exception as exc:
        log.error("workload failed", workload=workload.name, error=repr(exc))


async def run_domain(
    xs: XenstoreClient,
    key: DomainKey,
    *,
    transport: str = "auto",
    listen: str | None = None,
    workloads: Sequence[Workload] | None = None,
    task_status: trio.TaskStatus[DomainRuntime] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run domain `key.domid` until it is destroyed, `DomainRuntime.stop()` is called (a
    graceful stop: devices close while the links still work) or the caller cancels.
    `workloads` run in the guest for the domain's life; None: the demo's (`demo_workloads`)
    and the NBD exports a vbd asks for (`NbdExports`, docs/nbd.md)."""
    info = await read_domain_info(xs, key.domid)
    with structlog.contextvars.bound_contextvars(domid=info.domid, domain=info.name):
        async with open_published_domain(
            xs,
            domid=info.domid,
            key=key,
            endpoint=listen or info.endpoint,
            name=info.name,
            page_size=info.page_size,
            memory_bytes=info.memory,
            transport=transport,
            **({} if info.max_maps is None else {"max_maps": info.max_maps}),
            **({} if info.max_ports is None else {"max_ports": info.max_ports}),
        ) as dom:
            rt = DomainRuntime(dom, xs, info, WorkloadContext(dom, xs, info.name))
            all_tasks: list[DeviceTasks] = []
            agent = FaultAgent(rt)  # idle (one watch) until a fault run publishes its node
            if wants_storage_faults():  # only then: a wrapped disk loses the in-task fast path
                rt.wrap_storage = agent.open_storage
            async with trio.open_nursery() as nursery:
                # The domain's own watch first: no device can use up the quota it needs.
                await nursery.start(_stop_when_destroyed, rt)
                nursery.start_soon(agent.run)
                for subtree, runner in (
                    ("backend", _serve_backend),
                    ("device", _attach_frontend),
                ):
                    for cls in DEVICE_CLASSES:
                        tasks = DeviceTasks(nursery, _bind(runner, rt), rt.device_failed)
                        all_tasks.append(tasks)
                        rt.device_tasks[(subtree, cls)] = tasks
                        await nursery.start(_watch_devices, rt, subtree, cls, tasks)
                default = [*demo_workloads(), NbdExports()]
                for workload in default if workloads is None else workloads:
                    nursery.start_soon(_run_workload, rt, workload)
                await rt.write_own(READY, str(os.getpid()))
                log.info(
                    "domain ready",
                    page_size=info.page_size,
                    endpoint=dom.endpoint,
                    transport=transport,
                )
                task_status.started(rt)
                await rt.stopping.wait()
                # Devices close first (frontends through xenbus, bounded in the drivers)
                # while the domain's links still run; then open_domain closes the links.
                with trio.move_on_after(0 if rt.destroyed else STOP_DEVICES_TIMEOUT):
                    for tasks in all_tasks:
                        while tasks.running:
                            await tasks.ended.wait()
                nursery.cancel_scope.cancel()
            log.info("domain stopped")


async def _stop_when_destroyed(
    rt: DomainRuntime, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    await _wait_destroyed(rt.xs, rt.info.domid, task_status)
    log.info("domain destroyed by the toolstack")
    rt.destroyed = True  # its devices are gone and xenstored drops it: no graceful close
    rt.stop()


def _bind(
    runner: Callable[[DomainRuntime, DeviceId], Awaitable[None]], rt: DomainRuntime
) -> Callable[[DeviceId], Awaitable[None]]:
    async def run(device: DeviceId) -> None:
        await runner(rt, device)

    return run
