"""A guest's blkfront as the NBD server's `BlockBackend`.

Block sizes come from what the frontend negotiated: the minimum is the disk's logical sector
size, the preferred size the grant size (4 KiB, or the granule with
docs/granule-extension.md: I/O in whole granules needs no partial grants). Requests the
server accepted are aligned and within the disk, so they go to blkfront as they are; a
backend restart under them only delays them (blkfront re-issues what was in flight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from xenpv.nbd.server import IoQueue

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront


class BlkfrontDisk:
    """`server.BlockBackend` over a connected `Blkfront`."""

    def __init__(self, front: Blkfront) -> None:
        self.front = front

    @property
    def size(self) -> int:
        return self.front.capacity

    @property
    def block_size(self) -> int:
        return self.front.info.sector_size

    @property
    def preferred_block_size(self) -> int:
        return max(self.front.info.grant_size, self.block_size)

    @property
    def read_only(self) -> bool:
        return self.front.info.read_only

    @property
    def can_discard(self) -> bool:
        return self.front.info.discard

    def io_queue(self) -> IoQueue:
        """Blkfront's submission/completion queue (the server's fast path)."""
        queue: IoQueue = self.front.io_queue()
        return queue

    async def read(self, offset: int, length: int) -> bytes:
        return await self.front.read(offset, length)

    async def write(self, offset: int, data: bytes) -> None:
        await self.front.write(offset, data)

    async def flush(self) -> None:
        await self.front.flush()

    async def discard(self, offset: int, length: int) -> None:
        await self.front.discard(offset, length)
