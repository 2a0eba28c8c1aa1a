"""The journal on real files: torn tails, compaction, generations, the directory lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenstore.journal import (
    FILE_HEADER,
    JOURNAL_MAGIC,
    Journal,
    JournalError,
    decode_records,
    encode_record,
)


def flip_bits(path: Path, index: int, mask: int) -> None:
    """Corrupt the file at `path`: XOR its byte at `index` with `mask`."""
    data = bytearray(path.read_bytes())
    data[index] ^= mask
    path.write_bytes(bytes(data))


def test_append_then_recover(tmp_path: Path) -> None:
    journal, recovered = Journal.open(tmp_path)
    assert recovered.snapshot is None and recovered.records == []
    journal.append(b"one")
    journal.append(b"two")
    journal.close()
    journal, recovered = Journal.open(tmp_path)
    assert recovered.records == [b"one", b"two"]
    assert recovered.torn_bytes == 0
    journal.close()


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=6),
    cut=st.integers(min_value=1, max_value=40),
)
def test_torn_tail_is_ignored_and_truncated(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], cut: int
) -> None:
    directory = tmp_path_factory.mktemp("j")
    journal, _ = Journal.open(directory)
    for p in payloads:
        journal.append(p)
    journal.close()
    path = directory / "journal"
    data = path.read_bytes()
    last = len(encode_record(payloads[-1]))
    cut = min(cut, last)  # tear inside the last record only
    path.write_bytes(data[: len(data) - cut])
    journal, recovered = Journal.open(directory)
    assert recovered.records == payloads[:-1]
    assert recovered.torn_bytes == last - cut
    journal.append(b"after")  # appends go after the last good record
    journal.close()
    _, recovered = Journal.open(directory)
    assert recovered.records == [*payloads[:-1], b"after"]


def test_corrupt_crc_stops_replay(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    journal.append(b"good")
    journal.append(b"flipped")
    journal.close()
    flip_bits(tmp_path / "journal", -1, 0xFF)
    journal, recovered = Journal.open(tmp_path)
    assert recovered.records == [b"good"]
    journal.close()


def test_compaction_replaces_journal_by_snapshot(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    journal.append(b"a")
    journal.compact(b"SNAP")
    journal.append(b"b")
    assert journal.generation == 1
    journal.close()
    journal, recovered = Journal.open(tmp_path)
    assert recovered.snapshot == b"SNAP"
    assert recovered.records == [b"b"]
    assert recovered.generation == 1
    journal.close()


def test_journal_older_than_snapshot_is_discarded(tmp_path: Path) -> None:
    # Crash between the snapshot rename and the journal rename: the old journal's records
    # are already inside the snapshot and must not be replayed twice.
    journal, _ = Journal.open(tmp_path)
    journal.append(b"in-snapshot")
    old = (tmp_path / "journal").read_bytes()
    journal.compact(b"SNAP")
    journal.close()
    (tmp_path / "journal").write_bytes(old)
    journal, recovered = Journal.open(tmp_path)
    assert recovered.snapshot == b"SNAP"
    assert recovered.records == []
    journal.close()


def test_newer_journal_without_snapshot_is_refused(tmp_path: Path) -> None:
    (tmp_path / "journal").write_bytes(FILE_HEADER.pack(JOURNAL_MAGIC, 3))
    with pytest.raises(JournalError, match="snapshot is missing"):
        Journal.open(tmp_path)


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    journal.compact(b"SNAPSHOT")
    journal.close()
    flip_bits(tmp_path / "snapshot", -2, 0x01)
    with pytest.raises(JournalError, match="corrupt snapshot"):
        Journal.open(tmp_path)


def test_data_dir_is_locked(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    with pytest.raises(JournalError, match="in use"):
        Journal.open(tmp_path)
    journal.close()
    Journal.open(tmp_path)[0].close()


def test_files_are_private(tmp_path: Path) -> None:
    journal, _ = Journal.open(tmp_path)
    journal.compact(b"x")
    journal.close()
    for name in ("journal", "snapshot", "lock"):
        assert os.stat(tmp_path / name).st_mode & 0o077 == 0


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_decode_records_never_raises_on_garbage(data: bytes) -> None:
    records, end = decode_records(data, 0)
    assert 0 <= end <= len(data)
    assert b"".join(encode_record(r) for r in records) == data[:end]
