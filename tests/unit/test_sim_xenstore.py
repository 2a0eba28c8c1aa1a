"""The real xenstored core in a simulation: same seed, same history of a racy workload."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

from xenpv.sim import kernel
from xenpv.sim.entropy import Entropy
from xenpv.sim.xenstore import run_xenstored


async def _racy_domains(entropy: Entropy) -> list[tuple[float, str]]:
    """Three writers race on one counter directory while dom0 watches it."""
    trace: list[tuple[float, str]] = []
    pauses = entropy.stream("workload/pauses")
    with tempfile.TemporaryDirectory() as data_dir, trio.fail_after(600):
        async with run_xenstored(Path(data_dir)) as xenstored, xenstored.connect(0) as dom0:
            await dom0.write("/race", "")
            async with dom0.watch("/race") as events:
                await events.__anext__()  # the watch fires once when registered

                async def writer(domid: int) -> None:
                    async with xenstored.connect(0) as client:
                        for step in range(4):
                            await client.write(f"/race/w{domid}", str(step))
                            trace.append((trio.current_time(), f"w{domid}={step}"))
                            await trio.sleep(pauses.choice([0.0, 0.01, 0.2]))

                async with trio.open_nursery() as nursery:
                    for domid in (1, 2, 3):
                        nursery.start_soon(writer, domid)
                for _ in range(12):
                    path, _token = await events.__anext__()
                    trace.append((trio.current_time(), f"event {path}"))
            final = {d: await dom0.read_text(f"/race/w{d}") for d in (1, 2, 3)}
    trace.append((0.0, repr(sorted(final.items()))))
    return trace


def test_xenstore_history_is_a_function_of_the_seed() -> None:
    first = kernel.run(_racy_domains, seed=11)
    second = kernel.run(_racy_domains, seed=11)
    assert first.value == second.value
    assert first.value[-1][1] == "[(1, '3'), (2, '3'), (3, '3')]"


def test_seeds_explore_different_interleavings() -> None:
    histories = {tuple(kernel.run(_racy_domains, seed=seed).value) for seed in range(6)}
    assert len(histories) > 1
