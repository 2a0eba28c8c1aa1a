"""Task steps counted rather than time measured: the hop-count tests' instrument."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class TaskSteps(trio.abc.Instrument):
    """Counts the task steps of every task in the run while it is installed."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


@contextmanager
def counting_task_steps() -> Iterator[TaskSteps]:
    """The steps every task of this trio run takes inside the block."""
    steps = TaskSteps()
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)
