"""The simulation kernel: same seed, same interleaving and timings; virtual time is free."""

from __future__ import annotations

import trio

from xenpv.sim import kernel
from xenpv.sim.entropy import Entropy


async def _racing_tasks(entropy: Entropy) -> list[tuple[float, str]]:
    """Tasks whose order depends only on trio's scheduler and the seeded sleeps."""
    trace: list[tuple[float, str]] = []
    delays = entropy.stream("workload/delays")

    async def worker(name: str) -> None:
        for step in range(5):
            await trio.lowlevel.checkpoint()  # a scheduling point with no clock in it
            trace.append((trio.current_time(), f"{name}.{step}"))
            await trio.sleep(delays.choice([0.0, 0.5, 1.0]))

    with trio.fail_after(60):  # simulated seconds: the clock autojumps
        async with trio.open_nursery() as nursery:
            for name in "abcdef":
                nursery.start_soon(worker, name)
    return trace


def test_same_seed_same_trace() -> None:
    first = kernel.run(_racing_tasks, seed=7)
    second = kernel.run(_racing_tasks, seed=7)
    assert first.value == second.value
    assert first.simulated_seconds == second.simulated_seconds
    assert len(first.value) == 30


def test_seeds_change_the_interleaving() -> None:
    traces = {tuple(kernel.run(_racing_tasks, seed=seed).value) for seed in range(8)}
    assert len(traces) > 1


def test_virtual_time_jumps() -> None:
    async def sleeper(_: Entropy) -> float:
        with trio.fail_after(7200):
            await trio.sleep(3600)
        return trio.current_time()

    result = kernel.run(sleeper, seed=1)
    assert result.simulated_seconds == 3600
    assert result.wall_seconds < 5


def test_scheduler_state_is_restored() -> None:
    import trio._core._run as trio_run

    # Hypothesis's trio plugin may already have switched the flag on in this process.
    flag, state = trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate()
    kernel.run(_racing_tasks, seed=3)
    assert (trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate()) == (flag, state)


def test_entropy_is_per_seed_and_per_name() -> None:
    one, same, other = Entropy(5), Entropy(5), Entropy(6)
    assert one.token_bytes("hv/challenge", 40) == same.token_bytes("hv/challenge", 40)
    assert one.token_bytes("hv/challenge", 40) != one.token_bytes("hv/challenge", 40)
    assert one.token_bytes("x", 16) != other.token_bytes("x", 16)
    assert one.domain_key(3).sign(b"p", b"c") == same.domain_key(3).sign(b"p", b"c")
    assert one.domain_key(3).seed_hex() != other.domain_key(3).seed_hex()
