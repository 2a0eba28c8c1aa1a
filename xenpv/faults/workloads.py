"""Workload building blocks that record what they do in a history (`BlockWorker`, `FrameFlow`).

`BlockWorker` drives any `Storage` (a device's disk, or a guest's view of it) with tagged
block writes, verifying reads and flushes, one operation at a time as one history process.
The runner uses it on real devices; the tests use it against `MemoryDisk`, `FaultyStorage`
and deliberately broken disks to show the block checker catches what it must.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from backends.storage.base import Storage, StorageError
from xenpv.faults.history import Recorder
from xenpv.faults.tags import (
    BlockTag,
    FrameTag,
    TagError,
    pack_block,
    pack_frame,
    parse_frame,
    read_value,
)


@dataclass
class BlockWorker:
    storage: Storage
    history: Recorder
    process: str  # e.g. guest4k/blk0; also the writer name in tags (at most 16 bytes)
    device_key: str  # e.g. vbd:guest4k:51712
    blocks: int = 16
    block_size: int = 4096
    flush_every: int = 8
    rng: random.Random = field(default_factory=random.Random)
    first_block: int = 0  # workers sharing a disk write disjoint block ranges
    _seq: int = 0
    _writes_since_flush: int = 0

    def key(self, block: int) -> str:
        """The block's key on the device (workers sharing a disk have disjoint keys)."""
        return f"{self.device_key}:block={self.first_block + block}"

    @property
    def writer(self) -> str:
        return self.process[-16:]

    async def write(self, block: int) -> bool:
        self._seq += 1
        tag = BlockTag(self.writer, block, self._seq)
        sector = self.storage.info().sector_size
        data = pack_block(tag, self.block_size, sector)
        key = self.key(block)
        self.history.append(self.process, "invoke", "write", key, tag.text)
        try:
            await self.storage.write((self.first_block + block) * self.block_size, [data])
        except StorageError as exc:
            self.history.append(self.process, "fail", "write", key, str(exc))
            return False
        self.history.append(self.process, "ok", "write", key, tag.text)
        self._writes_since_flush += 1
        if self.flush_every and self._writes_since_flush >= self.flush_every:
            await self.flush()
        return True

    async def read(self, block: int) -> str | None:
        key = self.key(block)
        self.history.append(self.process, "invoke", "read", key, None)
        try:
            data = await self.storage.read(
                (self.first_block + block) * self.block_size, self.block_size
            )
        except StorageError as exc:
            self.history.append(self.process, "fail", "read", key, str(exc))
            return None
        value = read_value(data, self.storage.info().sector_size)
        self.history.append(self.process, "ok", "read", key, value)
        return value

    async def flush(self) -> bool:
        self.history.append(self.process, "invoke", "flush", self.device_key, None)
        try:
            await self.storage.flush()
        except StorageError as exc:
            self.history.append(self.process, "fail", "flush", self.device_key, str(exc))
            return False
        self._writes_since_flush = 0
        self.history.append(self.process, "ok", "flush", self.device_key, None)
        return True

    async def step(self) -> None:
        """One random operation: a write (60%) or a read of a random block."""
        block = self.rng.randrange(self.blocks)
        if self.rng.random() < 0.6:
            await self.write(block)
        else:
            await self.read(block)

    async def verify_all(self) -> None:
        for block in range(self.blocks):
            await self.read(block)


@dataclass
class FrameFlow:
    """One tagged flow of frames from a sender to a receiver, recorded in a history.

    The sender calls `frame()` for the next payload and `sent(seq, ok)` once the transmit
    completed (or failed); the receiver calls `received(payload)` for every payload it gets.
    Sequence numbers start at 0 and increase by one."""

    history: Recorder
    key: str  # vif:GUEST:DEVID:flow=N
    flow: int
    sender: str  # history process names
    receiver: str
    size: int = 256
    next_seq: int = 0

    def frame(self) -> tuple[int, bytes]:
        seq = self.next_seq
        self.next_seq += 1
        self.history.append(self.sender, "invoke", "send", self.key, seq)
        return seq, pack_frame(FrameTag(self.flow, seq), self.size)

    def sent(self, seq: int, ok: bool = True) -> None:
        self.history.append(self.sender, "ok" if ok else "fail", "send", self.key, seq)

    def received(self, payload: bytes | bytearray | memoryview) -> int | None:
        try:
            tag = parse_frame(payload)
        except TagError as exc:
            self.history.append(self.receiver, "ok", "recv", self.key, f"corrupt: {exc}")
            return None
        if tag.flow != self.flow:
            self.history.append(
                self.receiver, "ok", "recv", self.key, f"corrupt: frame of flow {tag.flow}"
            )
            return None
        self.history.append(self.receiver, "ok", "recv", self.key, tag.seq)
        return tag.seq
