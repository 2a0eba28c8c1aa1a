"""Error types shared by every layer.

Each protocol has its own error type that maps to the value its wire format carries
(`XsError` → an errno name, `GrantError` → a GNTST status, `RingError` → a broken ring).
They all derive from `XenpvError`, which the CLI turns into one clear line and exit status 1
(2 for a `UsageError`).
"""

from __future__ import annotations

# Exit statuses of every `xenpv` command (docs/cluster.md).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # argparse's own status for a bad command line; a UsageError (a bad file too)
EXIT_INTERNAL = 70  # a bug: one line for the user, the traceback in the log
EXIT_INTERRUPTED = 130


class XenpvError(Exception):
    """Base class for errors that are reported to the user as one line, never a traceback."""


class UsageError(XenpvError):
    """The user asked for something impossible (bad flag value, bad topology file, ...)."""
