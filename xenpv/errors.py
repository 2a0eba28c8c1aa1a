"""Error types shared by every layer.

Each protocol has its own error type that maps to the value its wire format carries
(`XsError` → an errno name, `GrantError` → a GNTST status, `RingError` → a broken ring).
They all derive from `XenpvError`, which the CLI turns into one clear line and exit status 1.
"""

from __future__ import annotations


class XenpvError(Exception):
    """Base class for errors that are reported to the user as one line, never a traceback."""


class UsageError(XenpvError):
    """The user asked for something impossible (bad flag value, bad topology file, ...)."""
