"""Grant granules on real vifs: every mix of old/new ends and page sizes, end to end.

Two guests of one page size exchange frames of 60..65535 bytes and 64 KiB GSO frames through a
real netback (in a backend domain of another page size) and the switch, on both transports.
Each cell checks what both ends state in xenstore (`max-grant-granule-order`, the frontend's
`grant-granule-order`, the backend's echo), what the drivers use, and data integrity.
"Old" ends are the drivers with the extension removed: a netback built with
`granule_extension=False`, a netfront whose keys lose `grant-granule-order`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

import frontends.netfront.device as netfront_device
from backends.netback import Vif
from backends.switch import LiveSwitch
from frontends.netfront import Netfront, RxFrame, attach
from frontends.netfront.keys import frontend_keys
from tests.integration.bench_run import run_quick_bench
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import open_unix_domains
from tests.integration.test_net_integrity import mac_of, mac_text, opaque_frame, tcp_frame
from xenpv import granule
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.hv import Domain, StaticDirectory
from xenpv.toolstack.devices import create_vif
from xenpv.xenbus.core import Action, Closing, DeviceId
from xenpv.xenbus.handshake import KeyValues, read_state
from xenpv.xenbus.keys import XENPV_MAX_GRANULE_ORDER
from xenpv.xenstore.client import XenstoreClient, connect

SIZES = [60, 61, 1514, 4095, 4096, 4097, 9000, 16383, 16384, 16385, 32767, 32768, 65535]
TIMEOUT = 60


@dataclass(frozen=True)
class Mix:
    name: str
    guest_page: int
    backend_page: int
    backend_max: int | None  # None: a backend without the extension
    cap: int | None = None  # attach(granule_order=...)
    old_frontend: bool = False
    toolstack_max: int | None = None  # xenpv-max-grant-granule-order in the backend dir

    @property
    def expected(self) -> int:
        if self.backend_max is None or self.old_frontend:
            return 0
        return granule.frontend_choice(self.guest_page, self.backend_max, self.cap)


MIXES = [
    Mix("64k-guest-4k-backend", 65536, 4096, 4),
    Mix("4k-guest-64k-backend", 4096, 65536, 4),
    Mix("16k-guest-4k-backend", 16384, 4096, 4),
    Mix("16k-guest-64k-backend", 16384, 65536, 4),
    Mix("64k-guest-old-backend", 65536, 4096, None),
    Mix("old-64k-frontend-new-backend", 65536, 4096, 4, old_frontend=True),
    Mix("64k-guest-declines", 65536, 65536, 4, cap=0),
    Mix("64k-guest-toolstack-max-2", 65536, 4096, 2, toolstack_max=2),
]


@dataclass
class Net:
    xs: XenstoreClient
    guests: list[Domain]
    fronts: list[Netfront]
    vifs: list[Vif]
    devices: list[DeviceId]
    backend: Domain
    switch: LiveSwitch[Any]
    nursery: trio.Nursery
    stops: list[tuple[trio.CancelScope, trio.Event]]

    async def restart_backend(self, i: int, **kwargs: Any) -> Vif:
        """Kill vif `i`'s netback and start a new one (another configuration, maybe)."""
        scope, done = self.stops[i]
        scope.cancel()
        await done.wait()
        vif = Vif(self.backend, self.xs, self.devices[i], self.switch, **kwargs)
        self.vifs[i] = vif
        self.stops[i] = await self.nursery.start(_serve, vif)
        return vif


async def _serve(
    vif: Vif, task_status: trio.TaskStatus[tuple[trio.CancelScope, trio.Event]]
) -> None:
    done = trio.Event()
    try:
        with trio.CancelScope() as scope:
            task_status.started((scope, done))
            await vif.run()
    finally:
        done.set()


def _memory(page_size: int) -> int:
    # two queues: 256 rx pages + the tx arena (<= 4 MiB) each
    return 2 * (256 * page_size + (4 << 20)) + (32 << 20)


async def _open_domains(
    stack: AsyncExitStack, tmp: Path, transport: str, page_sizes: list[int]
) -> list[Domain]:
    """Domain 0 (the backend) and the guests, one per page size after the first."""
    specs = [
        (domid, size, (32 << 20) if domid == 0 else _memory(size))
        for domid, size in enumerate(page_sizes)
    ]
    return await open_unix_domains(stack, StaticDirectory(), tmp, transport, specs)


@asynccontextmanager
async def network(tmp: Path, xenstored: Xenstored, transport: str, mix: Mix) -> AsyncIterator[Net]:
    async with AsyncExitStack() as stack:
        doms = await _open_domains(
            stack, tmp, transport, [mix.backend_page, mix.guest_page, mix.guest_page]
        )
        xs = await stack.enter_async_context(connect(xenstored.unix))
        switch: LiveSwitch[Any] = LiveSwitch(queue_depth=1024)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        fronts, vifs, devices, stops = [], [], [], []
        for dom in doms[1:]:
            device = DeviceId("vif", dom.domid, 0, 0)
            await create_vif(xs, device, mac=mac_text(mac_of(dom.domid)))
            if mix.toolstack_max is not None:
                await xs.write(
                    f"{device.backend}/{XENPV_MAX_GRANULE_ORDER}", str(mix.toolstack_max)
                )
            vif = Vif(doms[0], xs, device, switch, granule_extension=mix.backend_max is not None)
            stops.append(await nursery.start(_serve, vif))
            cap = 0 if mix.old_frontend else mix.cap
            fronts.append(
                await stack.enter_async_context(attach(dom, xs, device, granule_order=cap))
            )
            vifs.append(vif)
            devices.append(device)
        for front in fronts:
            await front.wait_connected()
        for vif in vifs:
            await vif.wait_until(lambda v: v.connected)
        yield Net(xs, doms[1:], fronts, vifs, devices, doms[0], switch, nursery, stops)


def _old_frontend_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """netfront as it was before the extension: it never writes grant-granule-order."""
    real = frontend_keys

    def keys(*args: Any, **kwargs: Any) -> dict[str, str | int]:
        out = real(*args, **kwargs)
        out.pop(granule.FRONTEND_KEY, None)
        return out

    monkeypatch.setattr(netfront_device, "frontend_keys", keys)


async def _read(xs: XenstoreClient, path: str) -> str | None:
    raw = await xs.try_read(path)
    return None if raw is None else raw.decode()


async def collect(front: Netfront, want: int, into: list[RxFrame]) -> None:
    while len(into) < want:
        into.append(await front.receive())


@pytest.mark.parametrize("mix", MIXES, ids=[m.name for m in MIXES])
async def test_mix_negotiates_and_frames_arrive_intact(
    tmp_path: Path,
    xenstored: Xenstored,
    transport: str,
    mix: Mix,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if mix.old_frontend:
        _old_frontend_keys(monkeypatch)
    rng = random.Random(f"{mix.name}-{transport}")
    with trio.fail_after(TIMEOUT):
        async with network(tmp_path, xenstored, transport, mix) as net:
            want = mix.expected
            for front, vif, device in zip(net.fronts, net.vifs, net.devices, strict=True):
                # what both ends state
                advertised = await _read(net.xs, f"{device.backend}/{granule.BACKEND_MAX_KEY}")
                written = await _read(net.xs, f"{device.frontend}/{granule.FRONTEND_KEY}")
                echoed = await _read(net.xs, f"{device.backend}/{granule.FRONTEND_KEY}")
                if mix.backend_max is None:
                    assert (advertised, written, echoed) == (None, None, None)
                else:
                    assert advertised == str(mix.backend_max)
                    assert written == (None if mix.old_frontend else str(want))
                    assert echoed == str(want)
                # what both drivers use
                assert front.info.granule_order == want
                assert front.info.grant_size == granule.granule_size(want)
                assert vif.granule_order == want
                assert vif.granule == granule.granule_size(want)

            a, b = net.fronts
            sent: list[list[bytes]] = [[], []]
            got: list[list[RxFrame]] = [[], []]
            # prime the switch's MAC table (the first unicast frames would flood)
            for front in net.fronts:
                await front.send(opaque_frame(b"\xff" * 6, front.mac, 9, 0, 60, rng))
            per_way = 2 * len(SIZES) + 1

            async def sender(i: int, src: Netfront, dst: Netfront) -> None:
                for seq, size in enumerate(SIZES):
                    frame = opaque_frame(dst.mac, src.mac, 1, seq, size, rng)
                    await src.send(frame)
                    sent[i].append(frame)
                for seq, size in enumerate(SIZES):
                    frame = tcp_frame(dst.mac, src.mac, 4000 + i, seq, max(size, 60), rng)
                    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 1514 else None
                    await src.send(frame, gso=gso, csum_blank=True)
                    sent[i].append(frame)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(collect, b, per_way, got[0])
                nursery.start_soon(collect, a, per_way, got[1])
                nursery.start_soon(sender, 0, a, b)
                nursery.start_soon(sender, 1, b, a)
            for i in range(2):
                frames = [f.frame for f in got[i] if f.frame[:6] != b"\xff" * 6]
                for tcp in (False, True):  # each flow intact and in order
                    flow = [f for f in frames if (f[12:14] == b"\x08\x00") == tcp]
                    assert flow == [f for f in sent[i] if (f[12:14] == b"\x08\x00") == tcp]
                big = [f for f in got[i] if len(f.frame) == 65535 and f.gso is not None]
                assert big and big[0].gso is not None and big[0].gso.size == 1448
            for front in net.fronts:
                stats = front.stats()
                assert stats["rx_errors"] == 0 and stats["tx_errors"] == 0
            for vif in net.vifs:
                assert vif.fatal is None and vif.stats().tx_errors == 0


async def exchange(net: Net, rng: random.Random, sizes: list[int]) -> None:
    """Each guest sends `sizes` (64 KiB ones as GSO) to the other; all arrive intact."""
    a, b = net.fronts
    sent: list[list[bytes]] = [[], []]
    got: list[list[RxFrame]] = [[], []]

    async def sender(i: int, src: Netfront, dst: Netfront) -> None:
        for seq, size in enumerate(sizes):
            frame = tcp_frame(dst.mac, src.mac, 4000 + i, seq, size, rng)
            gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 1514 else None
            await src.send(frame, gso=gso, csum_blank=True)
            sent[i].append(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect, b, len(sizes), got[0])
        nursery.start_soon(collect, a, len(sizes), got[1])
        nursery.start_soon(sender, 0, a, b)
        nursery.start_soon(sender, 1, b, a)
    for i in range(2):
        assert [f.frame for f in got[i]] == sent[i]


async def test_renegotiated_after_backend_restart(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """The order is chosen per connection: a backend restarted without the extension, then
    with a maximum of 2, is followed; stale keys of the earlier connection disappear."""
    mix = Mix("restart", 65536, 4096, 4)
    rng = random.Random(transport)
    sizes = [60, 9000, 65535]
    with trio.fail_after(TIMEOUT):
        async with network(tmp_path, xenstored, transport, mix) as net:
            # prime the switch (learn both MACs) so unicast is not flooded
            for front in net.fronts:
                await front.send(opaque_frame(b"\xff" * 6, front.mac, 9, 0, 60, rng))
            for front in net.fronts:
                assert (await front.receive()).frame[:6] == b"\xff" * 6
            assert [f.info.granule_order for f in net.fronts] == [4, 4]
            await exchange(net, rng, sizes)
            for plan, want in (({"granule_extension": False}, 0), ({"max_granule_order": 2}, 2)):
                generations = [f.info.generation for f in net.fronts]
                for i in range(2):
                    await net.restart_backend(i, **plan)
                for i, front in enumerate(net.fronts):
                    while not (front.connected and front.info.generation > generations[i]):
                        await front.wait_disconnected()
                        await front.wait_connected()
                    await net.vifs[i].wait_until(lambda v: v.connected)
                for front, vif, device in zip(net.fronts, net.vifs, net.devices, strict=True):
                    assert front.info.granule_order == vif.granule_order == want
                    written = await _read(net.xs, f"{device.frontend}/{granule.FRONTEND_KEY}")
                    echoed = await _read(net.xs, f"{device.backend}/{granule.FRONTEND_KEY}")
                    if plan.get("granule_extension") is False:
                        assert (written, echoed) == (None, None)
                    else:
                        assert (written, echoed) == (str(want), str(want))
                await exchange(net, rng, sizes)


async def test_order_above_backend_max_is_fatal(
    tmp_path: Path, xenstored: Xenstored, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frontend that writes an order above max-grant-granule-order: `error`, then Closing."""
    monkeypatch.setattr(netfront_device, "negotiate_granule", lambda *_args: 4)
    mix = Mix("overreach", 65536, 4096, 2, toolstack_max=2)
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            doms = await _open_domains(
                stack, tmp_path, transport, [mix.backend_page, mix.guest_page]
            )
            xs = await stack.enter_async_context(connect(xenstored.unix))
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            device = DeviceId("vif", 1, 0, 0)
            await create_vif(xs, device, mac=mac_text(mac_of(1)))
            await xs.write(f"{device.backend}/{XENPV_MAX_GRANULE_ORDER}", "2")
            vif = Vif(doms[0], xs, device, LiveSwitch(queue_depth=16))
            nursery.start_soon(vif.run)
            error_path = "/local/domain/0/error/backend/vif/1/0/error"
            async with xs.watch(error_path) as events:
                await stack.enter_async_context(attach(doms[1], xs, device))
                async for _event in events:
                    if await xs.try_read(error_path) is not None:
                        break
            reason = await _read(xs, error_path)
            assert reason is not None
            assert "grant-granule-order 4 exceeds max-grant-granule-order 2" in reason
            assert not vif.connected and vif.connections == 0
            async with xs.watch(f"{device.backend}/state") as events:
                async for _event in events:
                    if await read_state(xs, device.backend) == Closing:
                        break
            assert await _read(xs, f"{device.backend}/{granule.FRONTEND_KEY}") is None


def test_bench_net_granule_quick_json() -> None:
    """`xenpv bench net-granule --quick` runs and reports both modes and the speed-up."""
    data, _table = run_quick_bench("net-granule", "--transport", "shm")
    modes = data["results"]["shm"]
    assert (modes["4k_split"]["granule"], modes["64k_granule"]["granule"]) == (4096, 65536)
    for mode in modes.values():
        assert all(r["received"] > 0 and r["mbps"] > 0 for r in mode["sizes"].values())
    assert set(data["speedup"]["shm"]) == {"9000", "64k_gso"}


class StaleOldVif(Vif):
    """A backend without the extension in a directory where a predecessor's
    `max-grant-granule-order` = 4 survived: it never echoes, and ignores the frontend's key."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, granule_extension=False, **kwargs)

    async def perform(self, action: Action) -> KeyValues | None:
        keys = await super().perform(action)
        if action in (Action.ADVERTISE, Action.RESET) and keys is not None:
            keys = {**keys, granule.BACKEND_MAX_KEY: 4}
        return keys


async def test_backend_without_echo_gets_4k_grants(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """netfront picks 64 KiB from the stale key, sees Connected without the echo, and
    reconnects with 4 KiB grants; frames then flow intact."""
    mix = Mix("stale", 65536, 4096, 4)
    rng = random.Random(transport)
    with trio.fail_after(TIMEOUT):
        async with network(tmp_path, xenstored, transport, mix) as net:
            for i in range(2):
                await net.restart_backend(i, granule_extension=True)  # a clean start: echo 4
            for i, front in enumerate(net.fronts):
                await front.wait_connected()
                await net.vifs[i].wait_until(lambda v: v.connected)
                assert front.info.granule_order == 4
            for i in range(2):  # replaced by the old backend; the advertisement survives
                scope, done = net.stops[i]
                scope.cancel()
                await done.wait()
                old = StaleOldVif(net.backend, net.xs, net.devices[i], net.switch)
                net.vifs[i] = old
                net.stops[i] = await net.nursery.start(_serve, old)
            for i, front in enumerate(net.fronts):
                while not (front.connected and front.info.granule_order == 0):
                    await front.wait_disconnected()
                    await front.wait_connected()
                assert "without echoing" in (front.granule_fallback or "")
                assert front.info.granule_fallback == front.granule_fallback
                await net.vifs[i].wait_until(lambda v: v.connected)
                assert net.vifs[i].granule_order == 0
            for front in net.fronts:
                await front.send(opaque_frame(b"\xff" * 6, front.mac, 9, 0, 60, rng))
            for front in net.fronts:
                assert (await front.receive()).frame[:6] == b"\xff" * 6
            await exchange(net, rng, [60, 9000, 65535])
            for vif in net.vifs:
                assert vif.fatal is None
