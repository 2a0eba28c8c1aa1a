"""Run an async function as a simulation: virtual time, seeded scheduling, seeded entropy.

The clock is trio's `MockClock` with `autojump_threshold=0`: whenever every task is blocked,
time jumps straight to the next deadline, so a run that sleeps for minutes of simulated time
finishes as fast as its computation allows, and the same seed gives the same timings.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio
import trio.testing

from xenpv.sim.entropy import Entropy
from xenpv.sim.scheduling import deterministic_scheduling

T = TypeVar("T")

# str hashes are salted per process: a set of strings (or of records holding one) iterates in
# an order that changes from process to process, and with it whatever a run does in that
# order. A seed must reproduce its run in any process, so simulated runs use one salt.
HASH_SEED = "0"


def term_as_interrupt() -> None:
    """From now on SIGTERM ends this command as Ctrl-C does (KeyboardInterrupt), so a
    simulated run's temporary directory is removed either way. Only for a command's own
    process (see `with_fixed_hash_seed`)."""
    if os.path.basename(sys.argv[0]) in ("xenpv", "__main__.py"):
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def with_fixed_hash_seed() -> None:
    """Make sure this `xenpv` command runs with PYTHONHASHSEED=HASH_SEED: if it does not,
    re-execute it (same arguments) with it set. Only from the command line's own process
    (`xenpv ...` or `python -m xenpv ...`), never from a host such as pytest."""
    if os.environ.get("PYTHONHASHSEED") == HASH_SEED:
        return
    if os.path.basename(sys.argv[0]) not in ("xenpv", "__main__.py"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, PYTHONHASHSEED=HASH_SEED)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


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
