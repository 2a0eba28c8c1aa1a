"""Crash-safe persistence for xenstored: one snapshot file plus an append-only journal.

Layout of the data directory:

    lock        flock()ed by the running server (a second server on the same dir refuses)
    snapshot    FILE HEADER + one RECORD whose payload is `Store.snapshot()`
    journal     FILE HEADER + RECORD*, each payload one group commit (msgpack list of changes)

    FILE HEADER = magic (8 bytes: b"XPVSNAP1" / b"XPVJRNL1") + generation (u64 LE)
    RECORD      = payload length (u32 LE) + crc32(payload) (u32 LE) + payload

`append` writes one record and fdatasyncs it before returning: the server sends no reply
until the record holding its changes is on disk. A crash can leave the last record torn;
recovery stops at the first record whose length runs past the end of the file or whose CRC
does not match, truncates the file there and reports the bytes dropped (never acknowledged).

`compact(snapshot)` writes `snapshot.tmp` with generation g+1, fsyncs, renames it over
`snapshot`, then replaces the journal by an empty one of generation g+1 the same way and
fsyncs the directory. A journal whose generation is older than the snapshot's is fully
contained in the snapshot (crash between the two renames) and is discarded on recovery.

This module does blocking file I/O; the server calls `append` and `compact` from a worker
thread, one at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from xenpv.errors import XenpvError

SNAPSHOT_MAGIC = b"XPVSNAP1"
JOURNAL_MAGIC = b"XPVJRNL1"
FILE_HEADER = struct.Struct("<8sQ")
RECORD_HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 30

log = structlog.get_logger()


class JournalError(XenpvError):
    """The data directory is unusable (locked, unreadable, corrupt snapshot, I/O error)."""


@dataclass(slots=True)
class Recovered:
    """What `Journal.open` found on disk."""

    snapshot: bytes | None
    records: list[bytes] = field(default_factory=list)
    torn_bytes: int = 0
    generation: int = 0


def encode_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_records(data: bytes, start: int) -> tuple[list[bytes], int]:
    """Valid records from `data[start:]` and the offset just after the last valid one."""
    records: list[bytes] = []
    pos = start
    while len(data) - pos >= RECORD_HEADER.size:
        length, crc = RECORD_HEADER.unpack_from(data, pos)
        end = pos + RECORD_HEADER.size + length
        if length > MAX_RECORD or end > len(data):
            break
        payload = data[pos + RECORD_HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        records.append(payload)
        pos = end
    return records, pos


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_file_atomically(directory: Path, name: str, data: bytes) -> None:
    tmp = directory / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / name)
    _fsync_dir(directory)


class Journal:
    """The open data directory. Create with `Journal.open`."""

    def __init__(self, directory: Path, lock_fd: int, fd: int, generation: int, size: int) -> None:
        self.directory = directory
        self.generation = generation
        self.size = size  # bytes in the current journal file
        self._lock_fd = lock_fd
        self._fd = fd

    @classmethod
    def open(cls, directory: Path) -> tuple[Journal, Recovered]:
        """Lock `directory` (created if missing), recover its content, open the journal."""
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True)
                _fsync_dir(directory.parent)  # the new directory's entry survives power loss
            lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot use data directory {directory}: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise JournalError(
                f"data directory {directory} is in use by another xenstored"
            ) from None
        try:
            journal, recovered = cls._recover(directory, lock_fd)
        except OSError as exc:
            os.close(lock_fd)
            raise JournalError(f"cannot recover {directory}: {exc}") from None
        except JournalError:
            os.close(lock_fd)
            raise
        return journal, recovered

    @classmethod
    def _recover(cls, directory: Path, lock_fd: int) -> tuple[Journal, Recovered]:
        snapshot, generation = _read_snapshot(directory / "snapshot")
        recovered = Recovered(snapshot=snapshot, generation=generation)
        path = directory / "journal"
        data = path.read_bytes() if path.exists() else b""
        usable = False
        if len(data) >= FILE_HEADER.size:
            magic, jgen = FILE_HEADER.unpack_from(data, 0)
            if magic != JOURNAL_MAGIC:
                raise JournalError(f"{path}: not a xenpv journal")
            if jgen > generation:
                raise JournalError(
                    f"{path}: generation {jgen} is newer than the snapshot's ({generation}); "
                    "the snapshot is missing"
                )
            usable = jgen == generation
        if usable:
            records, end = decode_records(data, FILE_HEADER.size)
            recovered.records = records
            recovered.torn_bytes = len(data) - end
            if recovered.torn_bytes:
                log.warning(
                    "journal tail torn, ignoring unacknowledged bytes",
                    path=str(path),
                    bytes=recovered.torn_bytes,
                )
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            size = end
        else:
            # Missing, torn header, or older generation (already inside the snapshot).
            _write_file_atomically(
                directory, "journal", FILE_HEADER.pack(JOURNAL_MAGIC, generation)
            )
            size = FILE_HEADER.size
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        return cls(directory, lock_fd, fd, generation, size), recovered

    def append(self, payload: bytes, *, durable: bool = True) -> None:
        """Write one record and make it durable (blocking). `durable=False` skips the sync:
        for a simulated xenstored, whose journal no crash can test (it charges virtual
        time for the sync instead)."""
        record = encode_record(payload)
        try:
            _write_all(self._fd, record)
            if durable:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise JournalError(f"journal write failed: {exc.strerror}") from None
        self.size += len(record)

    def compact(self, snapshot: bytes) -> None:
        """Replace snapshot + journal by `snapshot` and an empty journal (blocking)."""
        generation = self.generation + 1
        try:
            _write_file_atomically(
                self.directory,
                "snapshot",
                FILE_HEADER.pack(SNAPSHOT_MAGIC, generation) + encode_record(snapshot),
            )
            _write_file_atomically(
                self.directory, "journal", FILE_HEADER.pack(JOURNAL_MAGIC, generation)
            )
            fd = os.open(self.directory / "journal", os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise JournalError(f"compaction failed: {exc.strerror}") from None
        os.close(self._fd)
        self._fd = fd
        self.generation = generation
        self.size = FILE_HEADER.size

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._lock_fd = -1


def _read_snapshot(path: Path) -> tuple[bytes | None, int]:
    if not path.exists():
        return None, 0
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size:
        raise JournalError(f"{path}: truncated snapshot")
    magic, generation = FILE_HEADER.unpack_from(data, 0)
    if magic != SNAPSHOT_MAGIC:
        raise JournalError(f"{path}: not a xenpv snapshot")
    records, end = decode_records(data, FILE_HEADER.size)
    if len(records) != 1 or end != len(data):
        # Snapshots are written to a temporary file, fsynced and renamed: never torn.
        raise JournalError(f"{path}: corrupt snapshot (CRC or length mismatch)")
    return records[0], int(generation)
