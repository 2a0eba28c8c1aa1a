"""Seeded task scheduling for trio.

Trio shuffles each batch of runnable tasks with a module-level `random.Random` that is never
seeded, so two runs of the same program may interleave tasks differently. Trio itself offers a
deterministic mode for its Hypothesis integration: with `_ALLOW_DETERMINISTIC_SCHEDULING` set,
each batch is sorted by task creation order and then shuffled with `_r`, which can be seeded.
Both are private, so this module is the only place that touches them (checked against
trio 0.35; `_check_supported` fails loudly if a trio upgrade removes them).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio._core._run as _trio_run  # private: see the module docstring

from xenpv.errors import XenpvError


class SchedulingUnsupported(XenpvError):
    """The installed trio has no deterministic-scheduling hooks."""


def _check_supported() -> None:
    if not hasattr(_trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING") or not isinstance(
        getattr(_trio_run, "_r", None), random.Random
    ):
        raise SchedulingUnsupported(
            f"trio {getattr(_trio_run, '__version__', '?')}: no deterministic scheduling hooks"
        )


@contextmanager
def deterministic_scheduling(seed_material: int) -> Iterator[None]:
    """Within the block, trio runs tasks in an order fixed by `seed_material`.

    Restores trio's own (unseeded) behaviour afterwards. Not reentrant and not thread-safe:
    one simulated run at a time per process.
    """
    _check_supported()
    module: Any = _trio_run
    saved_flag = module._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = module._r.getstate()
    module._ALLOW_DETERMINISTIC_SCHEDULING = True
    module._r.seed(seed_material)
    try:
        yield
    finally:
        module._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag
        module._r.setstate(saved_state)
