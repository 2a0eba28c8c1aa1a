"""Adaptive busy polling before a waiter sleeps: KVM's halt-polling rule for a domain link.

On this kind of machine (a VM), a process that blocks in epoll and is woken a few µs later
pays far more for the sleep and wake-up of its CPU than for the wait itself: a notify round
trip between two processes measured 60-120 µs when both ends block at once, and 15-20 µs
when each end polls its socket briefly first. Linux has the same trade-off for sockets
(`SO_BUSY_POLL`, `net.core.busy_poll`), and KVM for an idle vCPU (`halt_poll_ns`).

The window adapts as KVM's does (virt/kvm/kvm_main.c, grow_halt_poll_ns/shrink_halt_poll_ns):
- data arrives while polling: keep the window;
- nothing came and the wait that followed was short (under the maximum window): polling a
  little longer would have caught it, so the window grows (from GROW_START, doubling);
- the wait that followed was long: polling only burnt CPU, so the window halves (and drops
  to zero below GROW_START, until a short wait grows it again).

Between attempts the poller calls `sched_yield`, so a peer sharing the CPU runs at once
instead of waiting for the poller's time slice to end. The maximum comes from the
environment variable XENPV_BUSY_POLL_US (default 50, as Linux's recommended busy_poll; 0
turns polling off).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_MAX_US = 50.0
GROW_START = 10e-6


def max_window_from_env() -> float:
    """The maximum window in seconds (XENPV_BUSY_POLL_US; malformed or negative means 0)."""
    raw = os.environ.get("XENPV_BUSY_POLL_US")
    if raw is None:
        return DEFAULT_MAX_US * 1e-6
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return max(0.0, value) * 1e-6


class AdaptivePoll:
    """One waiter's polling window (seconds), adapted after every wait."""

    __slots__ = ("maximum", "window")

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self.window = maximum

    def spin(self, attempt: Callable[[], T | None]) -> T | None:
        """Call `attempt` until it returns something other than None or the window ends."""
        window = self.window
        if window <= 0.0:
            return None
        clock = time.perf_counter
        deadline = clock() + window
        while True:
            result = attempt()
            if result is not None or clock() >= deadline:
                return result
            os.sched_yield()

    def blocked(self, seconds: float) -> None:
        """The waiter had to sleep for `seconds` after an unsuccessful spin."""
        maximum = self.maximum
        if seconds < maximum:
            self.window = min(maximum, max(GROW_START, self.window * 2))
        elif self.window > 0.0:
            half = self.window / 2
            self.window = half if half >= GROW_START else 0.0
