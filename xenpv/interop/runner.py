"""Running the matrix as a real cluster: backend domains and guests as separate processes.

1. `cluster.launch` starts xenstored and three backend domains (`xenpv domain` processes with
   4 KiB, 16 KiB and 64 KiB pages; they serve whatever vbd/vif directories appear for them).
2. As the toolstack, the runner creates three guest domains (4K/16K/64K pages) and, per cell,
   its device(s) between the cell's guest and backend: one vbd (an in-memory disk), or two vifs
   (the echo pair). The backend's configuration keys for the cell (its `xenpv-*` feature
   offers, and `xenpv-max-grant-granule-order`: 0 with the extension off, 4 with it on) are
   written in the same transaction as the device (`devices.create_vbd/create_vif`), so the
   backend never sees the device without them.
3. One worker process per guest (`python -m xenpv.interop.worker`), one after another, so
   throughput figures are not shared with the other guests; each runs its cells in turn and
   counts them in xenstore, and the runner removes each finished cell's devices (as xl
   detach would), so a guest's node quota (1000, C xenstored's default) is never the limit.
4. Every cell is judged (`verdict.judge`); a cell a worker did not report fails.
Leaving `launch` stops every process (workers are registered as its guests) and removes every
device and domain.

`--quick` shortens transfers (bytes per vbd, frames per vif pair), never drops cells.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import structlog
import trio

from xenpv.interop.matrix import Cell, VbdProfile, VifProfile, enumerate_cells
from xenpv.interop.verdict import judge, speedups
from xenpv.interop.worker import DONE_KEY, backend_error_path
from xenpv.metrics.files import metrics_path
from xenpv.toolstack import cluster, devices
from xenpv.toolstack import domains as toolstack
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.supervisor import Supervisor
from xenpv.toolstack.topology import DomainSpec, Topology, Transport, VbdFeatures
from xenpv.xenbus.core import DeviceId, xvd_number
from xenpv.xenbus.keys import XENPV_MAX_GRANULE_ORDER, XENPV_MAX_QUEUES
from xenpv.xenstore.client import Transaction, XenstoreClient

log = structlog.get_logger()

MEMORY = 256 << 20
DISK_BASE = 1 << 20  # the worker's bulk I/O starts at 1 MiB


@dataclass(frozen=True, slots=True)
class Options:
    quick: bool = False
    transport: Transport = "auto"
    ready_timeout: float = 60.0
    attach_timeout: float = 20.0
    log_level: str = "info"

    @property
    def vbd_bytes(self) -> int:
        return (2 << 20) if self.quick else (32 << 20)

    @property
    def vif_frames(self) -> int:
        return 48 if self.quick else 600

    @property
    def cell_timeout(self) -> float:
        return 30.0 if self.quick else 120.0


@dataclass(slots=True)
class Outcome:
    cells: list[dict[str, Any]]
    speedup_64k: dict[str, Any]
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        detail = self.speedup_64k.get("detail", {})
        return {
            "cells": self.cells,
            "speedup_64k": {k: v for k, v in self.speedup_64k.items() if k != "detail"},
            "speedup_64k_detail": detail,
            "ok": all(c["ok"] for c in self.cells),
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _page_name(page: int) -> str:
    return f"{page >> 10}k"


def topology(transport: Transport) -> Topology:
    """The backend domains (guests are created by the runner, with their devices)."""
    backends = tuple(
        DomainSpec(f"backend{_page_name(p)}", "backend", p, MEMORY) for p in (4096, 16384, 65536)
    )
    return Topology(backends, transport=transport)


class _WithBackendKeys:
    """A XenstoreClient stand-in for `devices.create_*`: their transaction also writes
    `extra` into the backend directory, so the backend's first look sees the whole config."""

    def __init__(self, xs: XenstoreClient, device: DeviceId, extra: Mapping[str, str]) -> None:
        self._xs, self._device, self._extra = xs, device, extra

    async def transact(self, body: Callable[[Transaction], Awaitable[Any]]) -> Any:
        async def with_extra(tx: Transaction) -> Any:
            result = await body(tx)
            for key, value in self._extra.items():
                await tx.write(f"{self._device.backend}/{key}", value)
            return result

        return await self._xs.transact(with_extra)


def _mac(guest: int, index: int) -> str:
    return f"00:16:3e:{0x40 + guest:02x}:{index >> 8:02x}:{index & 0xFF:02x}"


async def _create_cell_devices(
    xs: XenstoreClient, cell: Cell, guest: int, backend: int, index: int, opts: Options
) -> list[DeviceId]:
    """The cell's device(s); `index` is the cell's position among its guest's cells of its
    class."""
    extra = {XENPV_MAX_GRANULE_ORDER: str(cell.backend_max_order)}
    profile = cell.profile
    if isinstance(profile, VbdProfile):
        device = DeviceId("vbd", guest, backend, xvd_number(index))
        features = replace(
            VbdFeatures(),
            ring_page_order=profile.ring_page_order,
            queues=profile.queues,
            indirect_segments=profile.indirect_segments,
            persistent=profile.persistent,
            max_granule_order=cell.backend_max_order,
        )
        size = DISK_BASE + opts.vbd_bytes + (1 << 20)
        wrapped = cast(XenstoreClient, _WithBackendKeys(xs, device, extra))
        await devices.create_vbd(
            wrapped, device, VbdConfig(image=None, size=size, features=features)
        )
        return [device]
    assert isinstance(profile, VifProfile)
    extra[XENPV_MAX_QUEUES] = str(profile.queues)
    out = []
    for n in (2 * index, 2 * index + 1):
        device = DeviceId("vif", guest, backend, n)
        wrapped = cast(XenstoreClient, _WithBackendKeys(xs, device, extra))
        await devices.create_vif(wrapped, device, mac=_mac(guest, n))
        out.append(device)
    return out


def _endpoint(state_dir: Path, name: str, transport: str) -> str:
    if transport == "tcp":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp:127.0.0.1:{s.getsockname()[1]}"
    path = state_dir / "links" / f"{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return f"unix:{path}"


async def _reap(
    xs: XenstoreClient,
    domid: int,
    cell_devices: list[list[DeviceId]],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Remove each cell's devices once the guest's worker counted it done (xl detach)."""
    path = f"/local/domain/{domid}/{DONE_KEY}"
    removed = 0
    async with xs.watch(path) as events:
        task_status.started()
        async for _event in events:
            raw = await xs.try_read(path)
            done = int(raw) if raw is not None and raw.strip().isdigit() else 0
            while removed < min(done, len(cell_devices)):
                for device in cell_devices[removed]:
                    await devices.destroy_device(xs, device)
                removed += 1


async def _run_worker(
    running: cluster.Cluster,
    name: str,
    domid: int,
    plan: dict[str, Any],
    cell_devices: list[list[DeviceId]],
    limit_s: float,
) -> tuple[list[dict[str, Any]], str]:
    """Run one guest's worker; its results and, if it failed, why."""
    state_dir = running.state_dir
    plan_path = state_dir / f"{name}.plan.json"
    out = state_dir / f"{name}.results.jsonl"
    out.unlink(missing_ok=True)
    plan = plan | {"out": str(out)}
    plan_path.write_text(json.dumps(plan))
    child = await running.spawn_guest(
        name, [sys.executable, "-m", "xenpv.interop.worker", str(plan_path)], domid
    )
    proc = child.proc
    assert proc is not None
    why = ""
    with trio.move_on_after(limit_s):
        async with trio.open_nursery() as nursery:
            await nursery.start(_reap, running.xs, domid, cell_devices)
            code = await proc.wait()
            nursery.cancel_scope.cancel()
        if code != 0:
            why = f"worker {name} exited with status {code}: {child.tail()[-300:]}"
    if proc.returncode is None:
        why = f"worker {name} did not finish within {limit_s:.0f} s"
        proc.kill()
        await proc.wait()
    results = []
    if out.exists():
        for line in out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                results.append(json.loads(line))
    return results, why


async def _add_backend_errors(
    xs: XenstoreClient, result: dict[str, Any], made: list[DeviceId]
) -> None:
    """Append what the cell's backend recorded as fatal (read as dom0: the guest may not)."""
    for device in made:
        raw = await xs.try_read(backend_error_path(device))
        if raw is not None:
            text = raw.decode("utf-8", "replace")
            if text not in str(result.get("detail")):
                result["detail"] = f"{result.get('detail')}; backend {device} error: {text}"


async def run(
    state_dir: Path,
    opts: Options,
    cells: list[Cell] | None = None,
    *,
    sup: Supervisor | None = None,
) -> Outcome:
    """Run every cell (default: the whole matrix) in a fresh cluster under `state_dir`."""
    cells = enumerate_cells() if cells is None else cells
    start = trio.current_time()
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    async with cluster.launch(
        topology(opts.transport),
        state_dir,
        sup=sup,
        ready_timeout_s=opts.ready_timeout,
        log_level=opts.log_level,
    ) as running:
        xs = running.xs
        guests: dict[int, int] = {}
        for page in sorted({c.frontend_page for c in cells}):
            name = f"guest{_page_name(page)}"
            created = await toolstack.create_domain(
                xs,
                name=name,
                page_size=page,
                memory_bytes=MEMORY,
                endpoint=_endpoint(state_dir, name, opts.transport),
            )
            created.key.save(state_dir / "keys" / f"{name}.key")
            guests[page] = created.domid
            running.domids[name] = created.domid
        backends = {p: running.domids[f"backend{_page_name(p)}"] for p in (4096, 16384, 65536)}
        plans: dict[int, list[dict[str, Any]]] = {p: [] for p in guests}
        made_by_guest: dict[int, list[list[DeviceId]]] = {p: [] for p in guests}
        counters: dict[tuple[int, str], int] = {}
        for cell in cells:
            index = counters.get((cell.frontend_page, cell.device), 0)
            counters[(cell.frontend_page, cell.device)] = index + 1
            made = await _create_cell_devices(
                xs, cell, guests[cell.frontend_page], backends[cell.backend_page], index, opts
            )
            running.devices.extend(made)
            made_by_guest[cell.frontend_page].append(made)
            plans[cell.frontend_page].append(
                {
                    "key": cell.key,
                    "device": cell.device,
                    "backend_domid": backends[cell.backend_page],
                    # the backend process's counters (docs/metrics.md, counts per MiB)
                    "backend_metrics": str(
                        metrics_path(state_dir, f"backend{_page_name(cell.backend_page)}")
                    ),
                    "devids": [d.devid for d in made],
                    "granule_order": cell.frontend_granule_order,
                    "features": cell.features(),
                    "bytes": opts.vbd_bytes,
                    "frames": opts.vif_frames,
                    "attach_timeout": opts.attach_timeout,
                    "cell_timeout": opts.cell_timeout,
                }
            )
        transport = cluster.DOMAIN_TRANSPORT[opts.transport]
        for page, domid in guests.items():
            name = f"guest{_page_name(page)}"
            plan = {
                "xenstore": running.xenstore_tcp,
                "key_file": str(state_dir / "keys" / f"{name}.key"),
                "transport": transport,
                "cells": plans[page],
            }
            limit = len(plans[page]) * (opts.attach_timeout + opts.cell_timeout) + 30
            got, why = await _run_worker(running, name, domid, plan, made_by_guest[page], limit)
            for result in got:
                results[str(result.get("key"))] = result
            if why:
                for cell_plan in plans[page]:
                    failures[cell_plan["key"]] = why
    records = []
    for cell in cells:
        record = judge(cell, results.get(cell.key))
        if cell.key not in results and cell.key in failures:
            record["detail"] = failures[cell.key]
        records.append(record)
    by_key = {r["key"]: r for r in records}
    return Outcome(records, speedups(cells, by_key), trio.current_time() - start)
