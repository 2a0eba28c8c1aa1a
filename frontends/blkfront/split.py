"""How one block I/O becomes blkif ring requests, as Linux blkfront builds them.

An I/O's data lives in guest pages, starting `start` bytes into its first page (xenpv puts
it where the page cache would: at `disk offset % page size`). Grants are per grant frame
(4 KiB, the baseline; the negotiated grant size in general), so the data is cut at every
frame boundary into *chunks*, one segment each, never an empty one (Linux
`blkif_setup_rw_req_grant` walks each bio_vec with `gnttab_foreach_grant_in_range`).
A segment names sectors `first_sect..last_sect` (512-byte units) of its frame.

Chunks are grouped into ring requests of at most `max_segments` segments:
- 11 (BLKIF_MAX_SEGMENTS_PER_REQUEST) without indirect support; an I/O needing more gets
  more requests, the next one starting at `sector + sectors already covered` (what Linux
  does for a 64 KiB guest page: a second linked request at sector + 11·8);
- with `feature-max-indirect-segments`, a request of more than 11 segments is
  BLKIF_OP_INDIRECT carrying up to the negotiated maximum.
On a disk whose sector-size is 4096 every request must cover whole logical blocks (Linux
blkback fails a misaligned one), so a group ends on a logical block boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenpv.abi.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE


@dataclass(slots=True)
class Chunk:
    """The data bytes inside one grant frame: `offset` from the first page's start."""

    offset: int  # byte offset from the start of the I/O's first page
    length: int

    def frame_index(self, grant_size: int) -> int:
        """Which grant frame of the I/O's pages holds this chunk (0 = the first)."""
        return self.offset // grant_size

    def sectors(self, grant_size: int) -> tuple[int, int]:
        """(first_sect, last_sect) inside its frame."""
        inside = self.offset % grant_size
        return inside // SECTOR_SIZE, (inside + self.length) // SECTOR_SIZE - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """What one connection allows: negotiated at connect, so re-split after a reconnect."""

    max_segments: int  # per ring request: 11, or the negotiated indirect maximum
    logical_block: int = SECTOR_SIZE  # the disk's sector-size in bytes
    grant_size: int = 4096

    @property
    def indirect(self) -> bool:
        return self.max_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST


@dataclass(frozen=True, slots=True)
class Part:
    """One ring request of an I/O: chunks `first .. first+count-1` at `sector`."""

    first: int
    count: int
    sector: int
    indirect: bool
    length: int = 0  # bytes


def chunks(start: int, length: int, grant_size: int) -> list[Chunk]:
    """Cut `length` bytes starting `start` bytes into the first page at frame boundaries."""
    if start < 0 or length <= 0 or start % SECTOR_SIZE or length % SECTOR_SIZE:
        raise ValueError(f"chunks of {length} bytes at {start}: need 512-byte multiples")
    end = start + length
    first_end = min(end, (start // grant_size + 1) * grant_size)
    out = [Chunk(start, first_end - start)]
    last_start = max(first_end, end - end % grant_size)  # where a partial last chunk begins
    out.extend(Chunk(at, grant_size) for at in range(first_end, last_start, grant_size))
    if last_start < end:
        out.append(Chunk(last_start, end - last_start))
    return out


def plan(pieces: list[Chunk], sector: int, limits: Limits) -> list[Part]:
    """Group chunks into ring requests (see the module docstring)."""
    if limits.max_segments < 1:
        raise ValueError("a ring request carries at least one segment")
    block = limits.logical_block
    parts: list[Part] = []
    index = 0
    while index < len(pieces):
        count = min(limits.max_segments, len(pieces) - index)
        size = sum(c.length for c in pieces[index : index + count])
        while size % block and count > 1:  # end the request on a logical block boundary
            count -= 1
            size -= pieces[index + count].length
        if size % block:
            raise ValueError(f"{size} bytes at chunk {index} cannot form whole {block}-byte blocks")
        parts.append(Part(index, count, sector, count > BLKIF_MAX_SEGMENTS_PER_REQUEST, size))
        sector += size // SECTOR_SIZE
        index += count
    return parts
