"""A fault run's workloads inside one guest, and its liveness probes.

Started by the domain's fault agent once the runner publishes the run (`xenpv.faults.agent`);
every operation is recorded in the domain's history file, one history process per thread:

- block (`GUEST/blkN`): `BlockWorker`s over each of the guest's vbds in the workload, through
  its blkfront (`FrontDisk`), threads on disjoint block ranges, a flush every `flush_every`
  writes;
- net (`GUEST/net`): one `FrameFlow` per vif in the workload, to the next guest's vif in the
  workload (a ring over the vifs in topology order), unicast to that vif's MAC with an
  ethertype of its own; the receiver records each frame's tag;
- xenstore (`GUEST/xsN`): keyed writes (one in three in a transaction, so that commits can
  meet EAGAIN) and reads under `/local/domain/<id>/data/faults/xsN`, with a watch on that
  directory whose events are recorded.

Senders stop at `drain` (receivers keep receiving what is in flight), everything at cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio

from backends.storage.base import StorageError, StorageErrorKind, StorageInfo
from xenpv.errors import XenpvError
from xenpv.faults.control import ProcessLog, RunConfig
from xenpv.faults.history import Recorder
from xenpv.faults.schedule import Schedule, stream
from xenpv.faults.tags import INITIAL, TagError, parse_frame
from xenpv.faults.targets import DeviceTarget
from xenpv.faults.workloads import BlockWorker, FrameFlow
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreConnectionError
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from frontends.netfront.core import RxFrame
    from xenpv.hv import Domain
    from xenpv.xenstore.client import XenstoreClient


class FrameSinks(Protocol):
    def registered(
        self, device: DeviceId, sink: Callable[[RxFrame], bool]
    ) -> contextlib.AbstractContextManager[None]: ...


class WorkloadContext(Protocol):
    """`xenpv.runtime.workload.WorkloadContext`, as far as these workloads use it."""

    @property
    def blk(self) -> dict[DeviceId, Any]: ...
    @property
    def net(self) -> dict[DeviceId, Any]: ...
    @property
    def frames(self) -> FrameSinks: ...
    async def wait_devices_changed(self) -> None: ...


class DomainInfo(Protocol):
    @property
    def domid(self) -> int: ...
    @property
    def name(self) -> str: ...


class DomainRuntime(Protocol):
    """What the fault agent and these workloads use of a running domain
    (`xenpv.runtime.domain_process.DomainRuntime`; named here, not imported: that module
    starts the agent)."""

    @property
    def dom(self) -> Domain: ...
    @property
    def xs(self) -> XenstoreClient: ...
    @property
    def info(self) -> DomainInfo: ...
    @property
    def ctx(self) -> WorkloadContext: ...
    @property
    def base(self) -> str: ...
    async def write_own(self, key: str, value: str) -> None: ...


log = structlog.get_logger()

ETHERTYPE = 0x88B5  # IEEE "local experimental": the fault run's frames
PROBE_ETHERTYPE = 0x88B6
FLOW_INCARNATION = 1000  # a restarted sender's flow id: its flow + 1000 * incarnation
ATTACH_WAIT = 1.0  # seconds an operation waits for its device to be attached
PROBE_TIMEOUT = 2.0
WARM_UP = 0.2  # seconds after a sender's warm-up frame before its flow's frames
PROBE_RETRY = 0.2
IO_ERRORS = (XenpvError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def parse_mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


async def _attached(ctx: WorkloadContext, table: dict[DeviceId, Any], device: DeviceId) -> Any:
    """The device's frontend, waiting a little for it to be attached (None if it is not)."""
    with trio.move_on_after(ATTACH_WAIT):
        while device not in table:
            await ctx.wait_devices_changed()
    return table.get(device)


def sector_size_of(front: Any, default: int) -> int:
    """The blkfront's negotiated sector size (`default` before its first connection)."""
    try:
        return int(front.info.sector_size)
    except XenpvError:
        return default


@dataclass
class FrontDisk:
    """A guest's vbd as the `Storage` calls a `BlockWorker` makes (the blkfront behind it may
    come and go; an I/O while it is detached fails at once)."""

    ctx: WorkloadContext
    device: DeviceId
    sector_size: int = 512

    def info(self) -> StorageInfo:
        return StorageInfo(0, self.sector_size, self.sector_size, False, True, False, 0, 0, False)

    async def _front(self) -> Any:
        front = await _attached(self.ctx, self.ctx.blk, self.device)
        if front is None:
            raise StorageError(StorageErrorKind.CLOSED, f"{self.device} is not attached")
        self.sector_size = sector_size_of(front, self.sector_size)
        return front

    async def _io(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        front = await self._front()
        try:
            # The device's own I/O: device-targeted seams (ring, event) recognise it.
            with structlog.contextvars.bound_contextvars(device=str(self.device)):
                return await call(front)
        except IO_ERRORS as exc:
            raise StorageError(StorageErrorKind.IO, str(exc)) from None

    async def read(self, offset: int, length: int) -> bytes:
        data: bytes = await self._io(lambda front: front.read(offset, length))
        return data

    async def write(self, offset: int, buffers: Any) -> None:
        data = b"".join(bytes(b) for b in buffers)
        await self._io(lambda front: front.write(offset, data))

    async def flush(self) -> None:
        await self._io(lambda front: front.flush())


def _mine(schedule: Schedule, name: str, kind: str) -> list[tuple[DeviceTarget, Any]]:
    """(device, workload) pairs of this guest in workloads of `kind`."""
    out = []
    for w in schedule.workloads:
        if w.kind != kind:
            continue
        for target in w.targets:
            device = schedule.topology.device(target)
            if device.guest == name:
                out.append((device, w))
    return out


def device_id(config: RunConfig, device: DeviceTarget) -> DeviceId:
    return DeviceId(
        device.cls,  # type: ignore[arg-type]
        config.domids[device.guest],
        config.domids[device.backend],
        device.devid,
    )


async def _paced(rate: float, drain: trio.Event, step: Callable[[], Awaitable[Any]]) -> None:
    """Run `step` at `rate` per second (0: as fast as it goes) until `drain`."""
    period = 1.0 / rate if rate > 0 else 0.0
    next_at = trio.current_time()
    while not drain.is_set():
        await step()
        next_at += period
        await trio.sleep_until(max(next_at, trio.current_time()) if period else 0)
        if period == 0:
            await trio.lowlevel.checkpoint()


async def run_workloads(
    rt: DomainRuntime,
    schedule: Schedule,
    config: RunConfig,
    history: ProcessLog,
    go: trio.Event,
    drain: trio.Event,
    incarnation: int = 0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receivers and watches are set up first (then `task_status.started()`: this guest is
    ready), senders and block and xenstore operations begin at `go` and end at `drain`.
    `incarnation`: how many times this domain's agent began this run before (a restarted
    domain's threads get new history processes, writers and flows: values stay unique)."""
    name = rt.info.name
    who = name if incarnation == 0 else f"{name}.{incarnation}"
    recorder = history
    async with trio.open_nursery() as nursery:
        for sender, receiver, _w, flow in _flows(schedule):
            if receiver.guest == name:
                await nursery.start(_receive_flow, rt, config, recorder, sender, receiver, flow)
        xs_workers = []
        for w in schedule.workloads:
            if w.kind == "xenstore" and f"domain:{name}" in w.targets:
                for t in range(w.threads):
                    xs_workers.append(
                        await nursery.start(
                            _xenstore, rt, config, recorder, w.rate, w.blocks, t, who
                        )
                    )
        if incarnation == 0:
            await _format_block_regions(rt, schedule, config)
        else:
            await _all_attached(rt, schedule, config)
        task_status.started()
        await go.wait()
        for step, rate in xs_workers:
            nursery.start_soon(_paced, rate, drain, step)
        n = 0
        for device, w in _mine(schedule, name, "block"):
            disk = FrontDisk(rt.ctx, device_id(config, device))
            for t in range(w.threads):
                process = f"{who}/blk{n}"
                n += 1
                worker = BlockWorker(
                    disk,  # type: ignore[arg-type]  # the Storage calls a worker makes
                    recorder,
                    process,
                    device.key,
                    blocks=w.blocks,
                    block_size=w.size,
                    flush_every=w.flush_every,
                    rng=stream(config.seed, f"workload/{process}"),
                    first_block=t * w.blocks,
                )
                nursery.start_soon(_paced, w.rate, drain, worker.step)
        for sender, _receiver, w, flow in _flows(schedule):
            if sender.guest == name:
                nursery.start_soon(
                    _send_flow,
                    rt,
                    config,
                    recorder,
                    sender,
                    _receiver,
                    int(w.size),
                    float(w.rate),
                    flow + FLOW_INCARNATION * incarnation,
                    drain,
                )


FORMAT_CHUNK = 1 << 16
FORMAT_WAIT = 10.0  # seconds a guest's vbd has to attach for the format step


async def _format_block_regions(rt: DomainRuntime, schedule: Schedule, config: RunConfig) -> None:
    """Zero (and flush) the blocks this guest's block workloads will use, before the run:
    the checker reads zeroes as a block's initial value, and a disk that outlives runs (a
    compose volume, an image a self-test wrote) must not show an earlier run's data as
    "data no write produced". Not after a restart: by then the region holds this run's
    acknowledged writes."""
    for device, w in _mine(schedule, rt.info.name, "block"):
        disk = FrontDisk(rt.ctx, device_id(config, device))
        end = int(w.threads) * int(w.blocks) * int(w.size)
        with trio.move_on_after(FORMAT_WAIT) as scope:
            while True:
                try:
                    for offset in range(0, end, FORMAT_CHUNK):
                        await disk.write(offset, [bytes(min(FORMAT_CHUNK, end - offset))])
                    await disk.flush()
                    break
                except StorageError as exc:  # not attached yet, or a transient error
                    log.info("format of the block region waits", device=device.id, error=str(exc))
                    await trio.sleep(ATTACH_WAIT)  # a retry pace, not synchronisation
        if scope.cancelled_caught:
            log.error("block region not formatted: reads may find older data", device=device.id)


async def _all_attached(rt: DomainRuntime, schedule: Schedule, config: RunConfig) -> None:
    """A restarted guest is ready for the run once every device it is the frontend of is
    attached again (bounded): the runner ends a kill's fault window when this guest says it
    is ready, and a device whose records survived the restart still reads Connected."""
    mine = [
        (rt.ctx.blk if d.cls == "vbd" else rt.ctx.net, device_id(config, d))
        for d in schedule.topology.devices
        if d.guest == rt.info.name
    ]
    with trio.move_on_after(FORMAT_WAIT):
        while any(device not in table for table, device in mine):
            await rt.ctx.wait_devices_changed()


def _net_ring(schedule: Schedule, w: Any) -> list[DeviceTarget]:
    return [schedule.topology.device(t) for t in w.targets]


def _flows(schedule: Schedule) -> list[tuple[DeviceTarget, DeviceTarget, Any, int]]:
    """(sender vif, receiver vif, workload, flow id): each vif of a net workload sends to the
    next one in the workload's order (from another guest), the flow id numbers them."""
    out: list[tuple[DeviceTarget, DeviceTarget, Any, int]] = []
    for w in schedule.workloads:
        if w.kind != "net":
            continue
        vifs = _net_ring(schedule, w)
        for i, sender in enumerate(vifs):
            others = [v for v in vifs[i + 1 :] + vifs[:i] if v.guest != sender.guest]
            if others:
                out.append((sender, others[0], w, len(out)))
    return out


def _flow(
    history: Recorder, sender: DeviceTarget, receiver: DeviceTarget, size: int, flow: int
) -> FrameFlow:
    return FrameFlow(
        history,
        f"{sender.key}:flow={flow}",
        flow,
        f"{sender.guest}/net{flow}",
        f"{receiver.guest}/recv{flow}",
        size=max(64, size),
    )


def _header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big")


async def _send_flow(
    rt: DomainRuntime,
    config: RunConfig,
    history: Recorder,
    sender: DeviceTarget,
    receiver: DeviceTarget,
    size: int,
    rate: float,
    flow_id: int,
    drain: trio.Event,
) -> None:
    flow = _flow(history, sender, receiver, size, flow_id)
    device = device_id(config, sender)
    dst = parse_mac(config.macs[receiver.id])

    warmed: list[Any] = [None]  # the frontend the last warm-up frame went through

    async def step() -> None:
        front = await _attached(rt.ctx, rt.ctx.net, device)
        if front is None:
            return  # detached: nothing is sent (and nothing recorded)
        if warmed[0] is not front:
            # A frame racing the backend's switch port coming up may be dropped, as on a
            # real bridge: after each (re)attach an untracked frame goes first.
            warmed[0] = front
            with contextlib.suppress(*IO_ERRORS):
                mac = bytes(front.mac)
                await front.send(_header(mac, mac, PROBE_ETHERTYPE) + bytes(46))
            await trio.sleep(WARM_UP)
        seq, payload = flow.frame()
        try:
            await front.send(_header(dst, bytes(front.mac), ETHERTYPE) + payload)
        except IO_ERRORS:
            flow.sent(seq, ok=False)
            return
        flow.sent(seq)

    await _paced(rate, drain, step)


async def _receive_flow(
    rt: DomainRuntime,
    config: RunConfig,
    history: Recorder,
    sender: DeviceTarget,
    receiver: DeviceTarget,
    flow_id: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    flows = {flow_id: _flow(history, sender, receiver, 0, flow_id)}
    device = device_id(config, receiver)
    mine = parse_mac(config.macs[receiver.id])

    def take(rx: RxFrame) -> bool:
        frame = bytes(rx.frame)
        if len(frame) < 14 or frame[12:14] != ETHERTYPE.to_bytes(2, "big") or frame[:6] != mine:
            return False
        try:
            tag = parse_frame(frame[14:])
        except TagError:
            flows[flow_id].received(frame[14:])  # recorded as corrupt
            return True
        if tag.flow % FLOW_INCARNATION != flow_id:
            return False  # another flow's frame to this vif
        if tag.flow not in flows:  # the sender was restarted: a new flow
            flows[tag.flow] = _flow(history, sender, receiver, 0, tag.flow)
        flows[tag.flow].received(frame[14:])
        return True

    with rt.ctx.frames.registered(device, take):
        task_status.started()
        await trio.sleep_forever()


async def _xenstore(
    rt: DomainRuntime,
    config: RunConfig,
    history: Recorder,
    rate: float,
    keys: int,
    thread: int,
    who: str,
    task_status: trio.TaskStatus[tuple[Callable[[], Awaitable[None]], float]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """Registers the watch, hands back (step, rate) through `task_status`, then keeps
    recording watch events (the caller paces the steps)."""
    name = rt.info.name
    process = f"{who}/xs{thread}"
    base = f"{rt.base}/data/faults/xs{thread}"
    rng = stream(config.seed, f"workload/{process}")
    seq = 0
    xs = rt.xs

    async def watcher(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with xs.watch(base) as events:
            history.append(process, "ok", "xs-watch", f"xs:{name}:{base}", "registered")
            task_status.started()
            async for path, _token in events:
                history.append(f"{process}-watch", "info", "xs-watch", f"xs:{name}:{path}", "fired")

    async def step() -> None:
        nonlocal seq
        path = f"{base}/k{rng.randrange(max(1, keys))}"
        key = f"xs:{name}:{path}"
        draw = rng.random()
        if draw < 0.6:
            seq += 1
            value = f"{process}/{seq}"
            history.append(process, "invoke", "xs-write", key, value)
            try:
                if draw < 0.2:  # in a transaction: commits may meet EAGAIN (retried)

                    async def write(tx: Any) -> None:
                        await tx.write(path, value)

                    await xs.transact(write)
                else:
                    await xs.write(path, value)
            except XsError as exc:
                history.append(process, "fail", "xs-write", key, str(exc))
                return
            except (XenstoreConnectionError, OSError) as exc:
                history.append(process, "info", "xs-write", key, str(exc))
                return
            history.append(process, "ok", "xs-write", key, value)
        else:
            history.append(process, "invoke", "xs-read", key, None)
            try:
                raw = await xs.try_read(path)
            except (XsError, XenstoreConnectionError, OSError) as exc:
                history.append(process, "fail", "xs-read", key, str(exc))
                return
            history.append(process, "ok", "xs-read", key, INITIAL if raw is None else raw.decode())

    with contextlib.suppress(XsError, XenstoreConnectionError):
        await xs.mkdir(base)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher)
        task_status.started((step, rate))  # events keep being recorded after the steps end


async def probe_devices(
    rt: DomainRuntime, schedule: Schedule, config: RunConfig, history: ProcessLog
) -> None:
    """One successful probe I/O per device this guest is the frontend of, retried until it
    works (the runner's liveness phase bounds it)."""
    name = rt.info.name
    async with trio.open_nursery() as nursery:
        for device in schedule.topology.devices:
            if device.guest == name:
                nursery.start_soon(_probe, rt, config, history, device)


async def _probe(
    rt: DomainRuntime, config: RunConfig, history: ProcessLog, device: DeviceTarget
) -> None:
    did = device_id(config, device)
    process = f"{rt.info.name}/probe-{device.cls}{device.devid}"
    while True:
        history.append(process, "invoke", "probe", device.key, None)
        ok = False
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                if device.cls == "vbd":
                    front = await _attached(rt.ctx, rt.ctx.blk, did)
                    if front is not None:
                        sector = sector_size_of(front, 512)
                        await front.read(0, sector)
                        ok = True
                else:
                    front = await _attached(rt.ctx, rt.ctx.net, did)
                    if front is not None:
                        mac = bytes(front.mac)
                        await front.send(_header(mac, mac, PROBE_ETHERTYPE) + bytes(46))
                        ok = True
            except IO_ERRORS as exc:
                log.info("probe failed", device=device.id, error=str(exc))
        history.append(process, "ok" if ok else "fail", "probe", device.key, None)
        if ok:
            return
        await trio.sleep(PROBE_RETRY)
