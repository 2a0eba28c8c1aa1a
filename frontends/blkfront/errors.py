"""Errors a blkfront user sees: every failed I/O is a `BlkError` carrying the blkif status."""

from __future__ import annotations

from xenpv.abi.blkif import BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR
from xenpv.errors import XenpvError


class BlkError(XenpvError):
    """An I/O failed: `status` is the BLKIF_RSP_* value (the backend's, or the one Linux's
    block layer would report for a request it refuses before the ring: ERROR for a bad range
    or a read-only disk, EOPNOTSUPP for a feature the backend did not offer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{reason} (blkif status {status})")
        self.status = status
        self.reason = reason


def io_error(reason: str) -> BlkError:
    return BlkError(int(BLKIF_RSP_ERROR), reason)


def not_supported(reason: str) -> BlkError:
    return BlkError(int(BLKIF_RSP_EOPNOTSUPP), reason)


class BlkfrontProtocolError(XenpvError):
    """The backend broke the blkif protocol (a response to no pending request, a broken
    ring): Linux blkfront stops the ring (BLKIF_STATE_ERROR); xenpv closes the connection
    through xenbus and re-issues the unfinished requests on the next one."""


class DeviceNotFound(XenpvError):
    """`attach` was asked for a device the toolstack did not create (no frontend directory
    naming a backend): Linux only probes devices that exist in xenstore."""
