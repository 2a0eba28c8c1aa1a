"""Real hv domains in a simulation: event-channel traffic between domains is seed-determined."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from xenpv.hv import EventChannel
from xenpv.sim import kernel
from xenpv.sim.entropy import Entropy
from xenpv.sim.hv import open_domains


async def _event_storm(entropy: Entropy) -> list[tuple[float, str]]:
    """dom0 echoes every event from three guests, which notify at seeded moments."""
    trace: list[tuple[float, str]] = []
    pauses = entropy.stream("workload/pauses")
    with tempfile.TemporaryDirectory() as socket_dir, trio.fail_after(600):
        async with open_domains(entropy, Path(socket_dir), (0, 1, 2, 3)) as domains:
            dom0, guests = domains[0], domains[1:]
            async with trio.open_nursery() as nursery:
                for guest in guests:
                    offered = await guest.alloc_unbound(0)
                    bound = await dom0.bind_interdomain(guest.domid, offered.port)

                    async def echo(port: EventChannel = bound, domid: int = guest.domid) -> None:
                        while True:
                            await port.wait()
                            trace.append((trio.current_time(), f"dom0<-{domid}"))
                            port.notify()

                    nursery.start_soon(echo)

                    async def ping(port: EventChannel = offered, domid: int = guest.domid) -> None:
                        for round_ in range(5):
                            port.notify()
                            await port.wait()
                            trace.append((trio.current_time(), f"{domid} round {round_}"))
                            await trio.sleep(pauses.choice([0.0, 0.001, 0.1]))

                    nursery.start_soon(ping)
                with trio.move_on_after(30):  # simulated: long after the pings end
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
    return trace


def test_domains_traffic_is_a_function_of_the_seed() -> None:
    first = kernel.run(_event_storm, seed=5)
    second = kernel.run(_event_storm, seed=5)
    assert first.value == second.value
    assert sum("round" in what for _, what in first.value) == 15


def test_seeds_explore_different_interleavings() -> None:
    histories = {tuple(kernel.run(_event_storm, seed=seed).value) for seed in range(6)}
    assert len(histories) > 1
