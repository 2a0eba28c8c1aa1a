"""structlog configuration, done once per entry point (CLI, domain process, test session).

Modules log with `structlog.get_logger()` and bind context (domid, device, port) with
`structlog.contextvars.bound_contextvars`. Output goes to stderr: JSON lines when stderr is
not a TTY (machines read it), a console renderer otherwise. Never use structlog's `a*`
methods under trio: they call asyncio.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO, cast

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")


class _Stderr:
    """Whatever `sys.stderr` is at write time (tests and daemons may swap it after set-up)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog process-wide. `json=None` picks JSON unless `stream` is a TTY."""
    out = stream if stream is not None else sys.stderr
    if json is None:
        json = not out.isatty()
    renderer: structlog.typing.Processor
    if json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(
            file=out if stream is not None else cast(TextIO, _Stderr())
        ),
        cache_logger_on_first_use=False,
    )
