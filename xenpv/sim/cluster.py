"""A whole topology in one simulated trio run: xenstored, the toolstack and every domain.

Each domain is `xenpv.runtime.domain_process.run_domain`, the same coroutine a `xenpv domain`
process runs (the real blk/net drivers, xenbus handshakes and fault agent), here with its own
xenstore connection to the simulated xenstored (xenpv/sim/xenstore.py) as its own domid.
What the sim changes: image disks live in memory (xenpv/sim/storage.py), the link
transport is the socket-copy kind, busy polling is off.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Final

import trio

from xenpv.identity import DomainKey
from xenpv.runtime.domain_process import DomainRuntime, run_domain
from xenpv.runtime.workload import Workload
from xenpv.sim.storage import images_in_memory
from xenpv.sim.xenstore import SimXenstored, run_xenstored
from xenpv.toolstack import provision
from xenpv.toolstack.topology import Topology
from xenpv.xenstore.client import XenstoreClient

SIM_TRANSPORT: Final = "socket"


@dataclasses.dataclass(eq=False)
class SimCluster:
    """What the fault runner needs of a cluster (`xs`, `domids`, `children`) and more."""

    xenstored: SimXenstored
    xs: XenstoreClient  # dom0's
    domids: dict[str, int]
    runtimes: dict[str, DomainRuntime]
    children: list[Any] = dataclasses.field(default_factory=list)  # no processes in a sim


def sim_topology(topo: Topology) -> Topology:
    """`topo` as the sim runs it: socket transport (images are served from memory:
    xenpv/sim/storage.py)."""
    return dataclasses.replace(topo, transport=SIM_TRANSPORT)


@contextmanager
def _no_busy_poll() -> Iterator[None]:
    # Busy polling spins on the wall clock; in a simulated run it would only burn CPU.
    saved = os.environ.get("XENPV_BUSY_POLL_US")
    os.environ["XENPV_BUSY_POLL_US"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["XENPV_BUSY_POLL_US"]
        else:
            os.environ["XENPV_BUSY_POLL_US"] = saved


@asynccontextmanager
async def run_cluster(
    topo: Topology,
    state_dir: Path,
    workloads: dict[str, Sequence[Workload]] | None = None,
) -> AsyncIterator[SimCluster]:
    """Provision `topo` (as `sim_topology`) into a fresh simulated xenstored and run every
    domain until the block ends; `workloads` by domain name (None: each domain runs the
    default workloads a `xenpv domain` process runs)."""
    topo = sim_topology(topo)
    for sub in ("xenstore", "keys", "links"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    with _no_busy_poll(), images_in_memory():
        async with AsyncExitStack() as stack:
            xenstored = await stack.enter_async_context(run_xenstored(state_dir / "xenstore"))
            dom0 = await stack.enter_async_context(xenstored.connect(0))
            done = await provision.apply_topology(
                dom0,
                topo,
                endpoint=lambda spec: f"unix:{state_dir / 'links' / spec.name}.sock",
                keys_dir=state_dir / "keys",
                image_dir=state_dir,
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            runtimes: dict[str, DomainRuntime] = {}
            ended: dict[str, trio.Event] = {}
            stack.push_async_callback(_stop_all, runtimes, ended)  # runs first
            # Backends first, as the launcher does: guests find their backends running.
            for spec in sorted(topo.domains, key=lambda d: d.role != "backend"):
                domid = done.domids[spec.name]
                key = DomainKey.load(state_dir / "keys" / f"{spec.name}.key")
                xs = await stack.enter_async_context(xenstored.connect(domid))
                ended[spec.name] = trio.Event()
                runtimes[spec.name] = await nursery.start(
                    _run_domain,
                    xs,
                    key,
                    None if workloads is None else workloads.get(spec.name, ()),
                    ended[spec.name],
                )
            yield SimCluster(xenstored, dom0, done.domids, runtimes)


async def _run_domain(
    xs: XenstoreClient,
    key: DomainKey,
    workloads: Sequence[Workload] | None,
    ended: trio.Event,
    *,
    task_status: trio.TaskStatus[DomainRuntime] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await run_domain(
            xs, key, transport=SIM_TRANSPORT, workloads=workloads, task_status=task_status
        )
    finally:
        ended.set()


async def _stop_all(runtimes: dict[str, DomainRuntime], ended: dict[str, trio.Event]) -> None:
    """Graceful stop, guests before backends (in reverse start order), as `xenpv down` does:
    frontends close their devices while the backends still serve them."""
    for name in reversed(list(runtimes)):
        runtimes[name].stop()
        await ended[name].wait()
