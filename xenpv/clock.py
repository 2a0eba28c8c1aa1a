"""The monotonic clock of fault runs' histories and link faults, with a simulation seam.

Real runs read CLOCK_MONOTONIC (one clock for every process of a host). A simulated run
(xenpv/sim/) installs trio's virtual clock instead, so that its history's timestamps, and so
its history hash, are a function of the seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

_source: Callable[[], float] = time.monotonic


def monotonic() -> float:
    return _source()


def install(source: Callable[[], float] | None) -> None:
    """Use `source` from now on (None: CLOCK_MONOTONIC again)."""
    global _source
    _source = time.monotonic if source is None else source
