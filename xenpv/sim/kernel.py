"""Run an async function as a simulation: virtual time, seeded scheduling, seeded entropy.

The clock is trio's `MockClock` with `autojump_threshold=0`: whenever every task is blocked,
time jumps straight to the next deadline, so a run that sleeps for minutes of simulated time
finishes as fast as its computation allows, and the same seed gives the same timings.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
import trio.testing

from xenpv.sim.entropy import Entropy
from xenpv.sim.scheduling import deterministic_scheduling

T = TypeVar("T")


@dataclass(frozen=True)
class SimResult(Generic[T]):
    value: T
    simulated_seconds: float
    wall_seconds: float  # reported only, never part of anything hashed


def run(main: Callable[[Entropy], Awaitable[T]], seed: int) -> SimResult[T]:
    """Run `main(entropy)` in a fresh trio run driven by `seed`; return its value and the
    simulated time it took."""
    entropy = Entropy(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = 0.0

    async def body() -> T:
        nonlocal started
        started = trio.current_time()
        return await main(entropy)

    wall_start = time.perf_counter()  # wall time for the report only
    with deterministic_scheduling(entropy.scheduler_seed()):
        value = trio.run(body, clock=clock)
    return SimResult(value, clock.current_time() - started, time.perf_counter() - wall_start)
