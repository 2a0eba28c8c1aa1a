"""What a command is waiting for, shown on a terminal while it waits (a rich spinner line).

    progress = Progress(enabled=sys.stderr.isatty() and not args.json)
    progress.show("waiting: 1/3 domains ready, 0/4 devices Connected")
    progress.close()            # before printing anything else; `show` opens it again

Disabled (not a terminal, `--json`), every call does nothing: pipes and logs get no extra
output.
"""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._status: Any = None

    @classmethod
    def for_terminal(cls, *, quiet: bool = False) -> Progress:
        """Enabled when stderr is a terminal, unless `quiet` (e.g. `--json`)."""
        return cls(enabled=not quiet and sys.stderr.isatty())

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self._status is None:
            from rich.console import Console

            self._status = Console(stderr=True).status(text)
            self._status.start()
        else:
            self._status.update(text)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


NO_PROGRESS = Progress(enabled=False)
