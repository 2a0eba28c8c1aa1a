"""Errors of the io-header ABI layer: rings, blkif and netif.

Typed by who broke the protocol (as in h11): `RingError` and the codec errors mean the *peer*
put something the headers forbid into shared memory; `RingUsageError` means *this* side asked
a ring for something impossible (put on a full ring, respond to an unconsumed request).
All derive from `AbiError`, itself a `XenpvError`, so nothing reaches a user as a traceback.
"""

from __future__ import annotations

from xenpv.errors import XenpvError


class AbiError(XenpvError):
    """Base of every error raised by `xenpv.abi`."""


class RingError(AbiError):
    """The peer broke the shared-ring protocol; the ring is unusable until it is reconnected.

    Linux blkback logs "Frontend provided bogus ring requests" and halts the ring; blkfront
    logs "illegal number of responses". The ring object that raised it keeps the reason in
    its `broken` attribute and raises again on every later use.
    """


class RingUsageError(AbiError):
    """This side misused a ring (a local bug, not the peer's fault): the ring stays usable."""


class BlkifError(AbiError):
    """A blkif request or response the headers forbid.

    `id` and `operation` are the request's (as read from the single copy taken out of the
    ring) when they could be read, so a backend can still answer `BLKIF_RSP_ERROR` to the
    right request, as Linux blkback does.
    """

    def __init__(self, reason: str, *, id: int | None = None, operation: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.id = id
        self.operation = operation


class BlkifUnsupportedOp(BlkifError):
    """An operation this side does not implement: a backend answers `BLKIF_RSP_EOPNOTSUPP`."""


class NetifError(AbiError):
    """A netif slot or packet the headers forbid (bad extra type, slot crossing a page, ...).

    `slots` is how many tx ring slots the offending packet occupies when that is known: a
    backend can then answer them (NETIF_RSP_ERROR, NETIF_RSP_NULL for extras) and carry on,
    as Linux netback does when it drops a packet; None means the ring cannot be parsed
    further (netback's xenvif_fatal_tx_err).
    """

    def __init__(self, reason: str, *, slots: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.slots = slots


class VirtioNetError(AbiError):
    """A virtio-net header of a size the TAP ABI does not have, or too short to read."""
