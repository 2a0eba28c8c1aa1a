"""One vbd in the backend domain: its handshake driver, its storage and its connection.

`BlkbackDevice.run()` serves the device for its whole life: it drives the xenbus handshake
(`xenpv.xenbus.handshake.run_handshake`, which also does the restart pick-up) with `perform`,
watches the backend directory, and returns once the toolstack removed it. Actions:

- ADVERTISE / RESET: (tear down what is left,) read the toolstack's keys, publish the
  feature keys with InitWait;
- CONNECT: tear down any previous rings (Linux: xen_blkif_disconnect first), read the
  frontend's keys, map every queue's ring (BACK_RING_ATTACH at the shared rsp_prod, which
  refuses a req_prod more than a ring ahead), bind the event channels, open the storage
  (once per device: a memory disk keeps its data across reconnects), start one
  `QueueWorker` per queue, publish the device keys with Connected. Anything wrong with the
  frontend's keys, rings or grants is Linux's `xenbus_dev_fatal`: log, switch to Closing,
  and the frontend may start over;
- CLOSE: stop taking requests, let those in flight finish, unmap everything, close the
  ports. We do it at the frontend's Closing already (Linux waits for Closed): a frontend
  that closes has stopped issuing requests, and a ring torn down late is a ring a departed
  frontend can still scribble on.

A ring with bogus producer indexes halts that device only: it is torn down and the backend
switches to Closing (Linux halts the ring and leaves the state alone; writing Closing lets a
well-behaved frontend notice and reconnect, and leaves the device dead for one that ignores
it). Other devices of the same backend are separate `serve` tasks and never notice.

A lost link to the frontend (its process died, or the domain link failed: docs/faults.md,
"Link faults") ends the queues as a dead frontend does; if the link is still down and the
backend still Connected, it closes as a restarted backend does (`backend_start`): tear down,
write Closed; the frontend closes, starts over at Initialising and re-issues its unfinished
requests on the new connection. A CONNECT that fails because the frontend is unreachable
waits `UNREACHABLE_BACKOFF` before switching to Closing, so a partition does not spin the
handshake.

Capacity change: `resize(new_size)`, or the toolstack re-writing `xenpv-size`, resizes the
storage and re-writes `sectors` with Connected in one transaction (Linux `vbd_resize`).
An existing image file keeps its own size when opened (`xenpv-size` is the creation size).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from backends.blkback.keys import (
    CONFIG_KEYS,
    MAX_DISK_SIZE,
    MAX_PERSISTENT_GRANTS,
    BackendConfig,
    ConfigError,
    FrontendParams,
    KeyValues,
    NegotiationError,
    advertise_keys,
    connect_keys,
    device_features,
    frontend_key_names,
    parse_config,
    parse_frontend,
    requested_granule,
    requested_order,
    requested_queues,
)
from backends.blkback.persistent import PersistentGrants
from backends.blkback.queue import QueueWorker
from backends.blkback.request import DeviceLimits, RequestCore
from backends.storage import MemoryDisk, RawImage, Storage
from xenpv.abi.ring import BackRing
from xenpv.errors import XenpvError
from xenpv.granule import FRONTEND_KEY, granule_size
from xenpv.hv import XEN_PAGE_SIZE, Domain, EventChannel, GrantMapping, PeerGone
from xenpv.hv.link import Link
from xenpv.metrics.registry import REGISTRY
from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import Action, Closed, Closing, Connected, DeviceId, InitWait
from xenpv.xenbus.handshake import read_keys, read_state, run_handshake
from xenpv.xenbus.keys import XENPV_SIZE, KeyValueError, parse_uint
from xenpv.xenstore.client import Transaction, XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

DRAIN_TIMEOUT = 10.0  # seconds to let requests in flight finish at disconnect
UNMAP_TIMEOUT = 5.0
HANDSHAKE_RETRY = 0.5
UNREACHABLE_BACKOFF = 0.25  # seconds before refusing a CONNECT the frontend's link failed


# A simulated run (xenpv/sim/storage.py) opens image disks itself: in memory, no threads.
image_opener: Callable[[BackendConfig], Storage] | None = None


def open_storage_from(config: BackendConfig) -> Storage:
    """The disk the toolstack configured: a memory disk, or a raw image (created sparse at
    `xenpv-size` if missing; an existing image keeps its size)."""
    if config.kind == "file" and image_opener is not None:
        return image_opener(config)
    if config.kind == "memory":
        assert config.size is not None  # parse_config requires it
        return MemoryDisk(config.size, sector_size=config.sector_size, read_only=config.read_only)
    if os.path.exists(config.path):
        return RawImage(config.path, read_only=config.read_only, sector_size=config.sector_size)
    if config.size is None or config.read_only:
        raise ConfigError(
            f"image {config.path!r} does not exist and cannot be created "
            f"({'read-only' if config.read_only else 'no ' + XENPV_SIZE})"
        )
    return RawImage(config.path, size=config.size, create=True, sector_size=config.sector_size)


@dataclass
class Connection:
    """Everything one CONNECT set up, torn down together."""

    params: FrontendParams
    mappings: list[GrantMapping] = field(default_factory=list)
    channels: list[EventChannel] = field(default_factory=list)
    workers: list[QueueWorker] = field(default_factory=list)
    grants: list[PersistentGrants] = field(default_factory=list)


class BlkbackDevice:
    """The backend of one vbd (a `xenpv.xenbus.handshake.HandshakeDriver`)."""

    role: xenbus.Role = "backend"

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        *,
        open_storage: Callable[[BackendConfig], Storage] | None = None,
    ) -> None:
        """`open_storage` replaces how the disk is opened from the configuration (tests use it
        to put a fault plan in front of the disk)."""
        self.dom = dom
        self.xs = xs
        self.device = device
        self.granule = XEN_PAGE_SIZE  # this connection's grant granule in bytes
        self.config: BackendConfig | None = None
        self.storage: Storage | None = None
        self.limits: DeviceLimits | None = None
        self.connection: Connection | None = None
        self._conn_link: Link | None = None  # the domain link the connection was set up on
        self.connections = 0  # successful CONNECTs, for tests and stats
        self.broken: str | None = None  # why the last connection was cut, if it was
        self._open = open_storage or open_storage_from
        self._lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._log = log.bind(device=str(device), backend=device.backend_domid)

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._handshake)
                await self._watch_backend_dir()
                self._log.info("device removed")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._teardown()
                if self.storage is not None:
                    await self.storage.close()
                    self.storage = None

    async def _handshake(self) -> None:
        while True:
            try:
                await run_handshake(self.xs, self)
            except XenstoreConnectionError:
                raise
            except XsError as exc:  # e.g. a frontend directory we may not read
                self._log.warning("handshake step failed; retrying", error=str(exc))
                await trio.sleep(HANDSHAKE_RETRY)

    async def _watch_backend_dir(self) -> None:
        backend = self.device.backend
        size_key = f"{backend}/{XENPV_SIZE}"
        async with self.xs.watch(backend) as events:
            async for path, _token in events:
                if path == backend:
                    if await self.xs.try_read(backend) is None:
                        return
                elif path == size_key:
                    await self._size_changed()

    # -- HandshakeDriver ---------------------------------------------------------------------

    async def perform(self, action: Action) -> KeyValues | None:
        if action in (Action.ADVERTISE, Action.RESET):
            await self._teardown()
            try:
                self.config = await self._read_config()
            except ConfigError as exc:  # xenbus_dev_fatal: the toolstack must fix its keys
                self._log.error("bad toolstack configuration", error=str(exc))
                await self._switch_state(Closing)
                return None
            return advertise_keys(self.config)
        if action is Action.CONNECT:
            return await self._connect()
        if action is Action.CLOSE:
            await self._teardown()
        return {}

    # -- connect ------------------------------------------------------------------------------

    async def _read_config(self) -> BackendConfig:
        keys = await read_keys(self.xs, self.device.backend, list(CONFIG_KEYS))
        return parse_config(keys)

    async def _read_frontend(self, config: BackendConfig) -> FrontendParams:
        frontend = self.device.frontend
        first = await read_keys(
            self.xs, frontend, ["multi-queue-num-queues", "ring-page-order", FRONTEND_KEY]
        )
        granule_order = requested_granule(first, config)
        names = frontend_key_names(
            requested_queues(first, config),
            requested_order(first, config, granule_order),
            granule_order,
        )
        return parse_frontend(await read_keys(self.xs, frontend, names), config)

    async def _connect(self) -> KeyValues | None:
        async with self._lock:
            await self._teardown_locked()
            try:
                config = self.config = await self._read_config()
                if self.storage is None:
                    self.storage = self._open(config)
                info = self.storage.info()
                features = device_features(config, info)
                params = await self._read_frontend(config)
                self.granule = granule_size(params.granule_order)
                limits = self.limits = DeviceLimits(
                    size=info.size,
                    sector_size=info.sector_size,
                    read_only=info.read_only,
                    features=features,
                    max_indirect_segments=config.max_indirect_segments,
                    granule=self.granule,
                )
                conn = self.connection = Connection(params)
                await self._setup_rings(conn, limits, self.storage)
                self._conn_link = self.dom.link_to(self.device.frontend_domid)
            except (XenpvError, OSError, ValueError) as exc:
                self._log.warning("connect failed (xenbus_dev_fatal)", error=str(exc))
                if isinstance(exc, PeerGone):
                    await trio.sleep(UNREACHABLE_BACKOFF)
                await self._teardown_locked()
                await self._record_error(str(exc))
                await self._switch_state(Closing)
                return None
            except Exception:  # a bug: fail this device only, loudly
                self._log.exception("connect failed unexpectedly")
                await self._teardown_locked()
                await self._switch_state(Closing)
                return None
            self.connections += 1
            self.broken = None
            self._log.info(
                "connected",
                queues=len(params.queues),
                ring_page_order=params.ring_page_order,
                protocol=params.protocol.name,
                persistent=params.persistent,
                sectors=info.sectors,
                granule_order=params.granule_order,
            )
            return connect_keys(
                info, features, cdrom=params.cdrom, granule_order=params.granule_order
            )

    async def _setup_rings(self, conn: Connection, limits: DeviceLimits, storage: Storage) -> None:
        """Map and bind every queue first, then start every worker without an await in
        between: a failure half-way leaves only mappings and ports for teardown to undo."""
        assert self._nursery is not None
        remote = self.device.frontend_domid
        params = conn.params
        rings: list[BackRing] = []
        for index, queue in enumerate(params.queues):
            mapping = await self.dom.map_grants(remote, queue.ring_refs)
            conn.mappings.append(mapping)
            if len(mapping.view) != len(queue.ring_refs) * self.granule:
                raise NegotiationError(
                    f"queue {index}: ring grants {queue.ring_refs} are not "
                    f"{self.granule}-byte pages"
                )
            rings.append(BackRing(mapping, params.protocol.ring_layout, attach=True))
            conn.channels.append(await self.dom.bind_interdomain(remote, queue.event_channel))
        for index, (ring, channel) in enumerate(zip(rings, conn.channels, strict=True)):
            persistent = None
            if params.persistent:
                persistent = PersistentGrants(self.dom, remote, MAX_PERSISTENT_GRANTS, self.granule)
                conn.grants.append(persistent)
            worker = QueueWorker(
                dom=self.dom,
                remote=remote,
                index=index,
                ring=ring,
                evtchn=channel,
                core=RequestCore(params.protocol, limits),
                storage=storage,
                persistent=persistent,
                on_broken=functools.partial(self._ring_broken, conn),
                on_gone=functools.partial(self._frontend_gone, conn),
            )
            worker.counters = REGISTRY.blkback_queue(
                self.dom.domid, remote, self.device.devid, index
            )
            conn.workers.append(worker)
            self._nursery.start_soon(worker.run)

    # -- disconnect ---------------------------------------------------------------------------

    def _ring_broken(self, conn: Connection, reason: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._disconnect_broken, conn, reason)

    def _frontend_gone(self, conn: Connection, reason: str) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._link_lost, conn)

    async def _link_lost(self, conn: Connection) -> None:
        """A queue found the frontend gone: if the link to it is down (the frontend may be
        alive), close as a restarted backend does so that the frontend starts over. A
        CONNECT whose Connected is not published yet (InitWait) is waited for: Closed
        written first would be overwritten."""
        try:
            async with self.xs.watch(f"{self.device.backend}/state") as events:
                async for _event in events:
                    async with self._lock:
                        link = self._conn_link
                        if self.connection is not conn or (link is not None and link.dead is None):
                            return  # torn down, or the frontend closed its port on a live link
                        state = await read_state(self.xs, self.device.backend)
                        if state == InitWait:
                            continue
                        if state != Connected:
                            return
                        await self._teardown_locked()
                        self._log.info("link to the frontend lost: closing so that it reconnects")
                        await self._switch_state(Closed)
                        return
        except (XsError, XenstoreConnectionError) as exc:
            self._log.warning("cannot close after a lost link", error=str(exc))

    async def _disconnect_broken(self, conn: Connection, reason: str) -> None:
        async with self._lock:
            if self.connection is not conn:
                return  # already torn down (and maybe reconnected)
            self.broken = reason
            await self._teardown_locked()
            if await read_state(self.xs, self.device.backend) == Connected:
                await self._switch_state(Closing)

    async def _teardown(self) -> None:
        async with self._lock:
            await self._teardown_locked()

    async def _teardown_locked(self) -> None:
        conn, self.connection = self.connection, None
        if conn is None:
            return
        for worker in conn.workers:
            worker.stop()
        with trio.move_on_after(DRAIN_TIMEOUT) as drain:
            for worker in conn.workers:
                await worker.done.wait()
        if drain.cancelled_caught:
            self._log.warning("requests still in flight at disconnect: cancelled")
            for worker in conn.workers:
                worker.abort()
            for worker in conn.workers:
                await worker.done.wait()
        with trio.move_on_after(UNMAP_TIMEOUT):
            for grants in conn.grants:
                await grants.release()
            for mapping in conn.mappings:
                await mapping.unmap()
        for channel in conn.channels:
            channel.close()

    async def _record_error(self, reason: str) -> None:
        """xenbus_dev_fatal's record: `/local/domain/<be>/error/<backend path>/error` (where
        Linux writes it, and netback and the interop runner read it), and `error` in the
        backend directory (docs/granule-extension.md)."""
        domain = xenbus.domain_path(self.device.backend_domid)
        relative = self.device.backend.removeprefix(domain + "/")
        for path in (f"{domain}/error/{relative}/error", f"{self.device.backend}/error"):
            try:
                await self.xs.write(path, reason)
            except XsError as exc:
                self._log.info("cannot record the error", path=path, error=str(exc))

    async def _switch_state(self, state: xenbus.XenbusState) -> None:
        """Write our state, unless the toolstack removed the device (xenbus_switch_state
        refuses to re-create a missing `state` node too)."""
        path = f"{self.device.backend}/state"

        async def body(tx: Transaction) -> None:
            if await tx.try_read(path) is not None:
                await tx.write(path, str(int(state)))

        await self.xs.transact(body)

    # -- capacity change ----------------------------------------------------------------------

    async def _size_changed(self) -> None:
        raw = await self.xs.try_read(f"{self.device.backend}/{XENPV_SIZE}")
        if raw is None or self.storage is None:
            return
        try:
            size = parse_uint(raw, XENPV_SIZE, maximum=MAX_DISK_SIZE)
        except KeyValueError as exc:
            self._log.warning("resize refused", error=str(exc))
            return
        if size == self.storage.info().size:
            return
        try:
            await self.resize(size)
        except XenpvError as exc:
            self._log.warning("resize refused", size=size, error=str(exc))

    async def resize(self, new_size: int) -> None:
        """Resize the storage and tell a connected frontend (re-write `sectors` + Connected)."""
        async with self._lock:
            if self.storage is None:
                raise ConfigError("the device has no storage open yet")
            await self.storage.resize(new_size)
            info = self.storage.info()
            if self.limits is not None:
                self.limits.size = info.size
            backend = self.device.backend

            async def body(tx: Transaction) -> None:
                raw = await tx.try_read(f"{backend}/state")
                if raw is not None and xenbus.parse_state(raw) == Connected:
                    await tx.write(f"{backend}/sectors", str(info.sectors))
                    await tx.write(f"{backend}/state", str(int(Connected)))

            await self.xs.transact(body)
            self._log.info("resized", sectors=info.sectors)
