"""The checkers pass correct histories and catch what they must: proofs that they can fail."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.storage import MemoryDisk, StorageInfo, WriteBuffer
from tests.unit.faults_helpers import DISK_KEY, VIF_KEY, Recorder
from xenpv.faults.checkers import CHECKERS, block, check_all, isolation, liveness, net, xenstore
from xenpv.faults.history import OPS
from xenpv.faults.storage import FaultyStorage
from xenpv.faults.workloads import BlockWorker

SECTOR = 512
DEV = "device:guest4k:vbd:xvda"


class AckWithoutKeeping(MemoryDisk):
    """A test-only disk that acknowledges every third write without keeping it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes = 0

    async def write(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        self.writes += 1
        if self.writes % 3 == 0:
            await trio.lowlevel.checkpoint()
            return
        await super().write(offset, buffers)


async def _drive(storage: MemoryDisk | FaultyStorage, rec: Recorder, ops: int = 200) -> None:
    worker = BlockWorker(
        storage,
        rec.writer,
        "guest4k/blk0",
        DISK_KEY,
        blocks=8,
        block_size=1024,
        flush_every=4,
        rng=random.Random(7),
    )
    for _ in range(ops):
        rec.clock.tick()
        await worker.step()
    await worker.verify_all()


async def test_block_checker_passes_a_correct_disk() -> None:
    with trio.fail_after(10):
        rec = Recorder()
        await _drive(MemoryDisk(64 * SECTOR), rec)
        assert block.check(rec.history()) == []


async def test_block_checker_catches_a_disk_that_acknowledges_without_keeping() -> None:
    with trio.fail_after(10):
        rec = Recorder()
        await _drive(AckWithoutKeeping(64 * SECTOR), rec)
        violations = block.check(rec.history())
        assert violations
        first = violations[0]
        assert first.checker == "block"
        assert first.key.startswith(DISK_KEY + ":block=")
        assert "stale read" in first.message or "initial value" in first.message
        assert first.active == ()  # and no fault excuses it


def _unflushed_worker(disk: FaultyStorage, rec: Recorder) -> BlockWorker:
    """Four 1 KiB blocks on the guest's first disk; flushes only when the test says."""
    return BlockWorker(
        disk, rec.writer, "guest4k/blk0", DISK_KEY, blocks=4, block_size=1024, flush_every=0
    )


async def test_power_cut_may_lose_unflushed_writes_but_not_flushed_ones() -> None:
    with trio.fail_after(10):
        rec = Recorder()
        disk = FaultyStorage(MemoryDisk(64 * SECTOR), write_cache=True)
        worker = _unflushed_worker(disk, rec)
        await worker.write(0)
        await worker.flush()
        await worker.write(1)  # never flushed
        await worker.write(0)  # overwrites a flushed block, never flushed
        from tests.unit.faults_helpers import fault

        cut = fault("storage.power-cut", DEV)
        rec.fault("fault-start", cut.id, cut.kind, DEV)
        disk.start(cut)
        disk.stop(cut)
        rec.fault("fault-stop", cut.id, cut.kind, DEV)
        assert await worker.read(0) == "guest4k/blk0/0/1"  # the flushed value came back
        assert await worker.read(1) == "initial"
        assert block.check(rec.history()) == []

        # The same loss with no power cut recorded is a violation...
        rec2 = Recorder()
        w2 = _unflushed_worker(disk, rec2)
        await w2.write(2)
        disk.power_cut()  # ...silently, as a buggy cache would
        await w2.read(2)
        lost = block.check(rec2.history())
        assert lost and lost[0].message.startswith("read the initial")

        # ...and so is losing a flushed write in a power cut.
        rec3 = Recorder()
        lying = FaultyStorage(MemoryDisk(64 * SECTOR), write_cache=True)
        w3 = _unflushed_worker(lying, rec3)
        await w3.write(3)
        await w3.flush()
        lying.inner.data[3 * 1024 : 4 * 1024] = bytes(1024)  # type: ignore[attr-defined]
        rec3.fault("fault-start", cut.id, cut.kind, DEV)
        rec3.fault("fault-stop", cut.id, cut.kind, DEV)
        await w3.read(3)
        found = block.check(rec3.history())
        assert len(found) == 1 and "initial" in found[0].message


def test_block_checker_flags_corrupt_and_foreign_values() -> None:
    rec = Recorder()
    rec("g/0", "invoke", "write", DISK_KEY + ":block=0", "g/0/1")
    rec("g/0", "ok", "write", DISK_KEY + ":block=0", "g/0/1")
    rec("g/0", "invoke", "read", DISK_KEY + ":block=0")
    rec("g/0", "ok", "read", DISK_KEY + ":block=0", "corrupt: checksum mismatch")
    rec("g/0", "invoke", "read", DISK_KEY + ":block=0")
    rec("g/0", "ok", "read", DISK_KEY + ":block=0", "g/5/9")
    found = block.check(rec.history())
    assert [v.index for v in found] == [4, 6]
    assert "never written" in found[1].message


def _flow(rec: Recorder, sends: list[int], receives: list[object], key: str = VIF_KEY) -> None:
    flow = key + ":flow=1"
    for seq in sends:
        rec("guest4k/tx", "invoke", "send", flow, seq)
        rec("guest4k/tx", "ok", "send", flow, seq)
    for value in receives:
        rec("peer/rx", "ok", "recv", flow, value)


def test_net_checker_accepts_an_intact_flow() -> None:
    rec = Recorder()
    _flow(rec, [0, 1, 2, 3], [0, 1, 2, 3])
    assert net.check(rec.history()) == []


def test_net_checker_catches_corrupt_duplicate_reordered_and_lost_frames() -> None:
    for receives, words in (
        ([0, "corrupt: checksum mismatch in flow 1 seq 1", 2, 3], "corrupted"),
        ([0, 1, 1, 2, 3], "duplicate"),
        ([0, 2, 1, 3], "out of order"),
        ([0, 1, 3], "gap: seq 2"),
        ([0, 1, 2], "never delivered"),
        ([0, 1, 2, 3, 9], "never sent"),
    ):
        rec = Recorder()
        _flow(rec, [0, 1, 2, 3], receives)
        found = net.check(rec.history())
        assert found, receives
        assert any(words in v.message for v in found), (receives, found)


def test_net_gaps_and_duplicates_need_a_matching_fault_on_that_guest() -> None:
    target = "link:backend-guest4k"
    rec = Recorder()
    rec.fault("fault-start", "f0.0", "link.loss", target)
    _flow(rec, [0, 1, 2, 3], [0, 1, 3])
    rec.fault("fault-stop", "f0.0", "link.loss", target)
    assert net.check(rec.history()) == []

    rec = Recorder()  # a loss on another guest's link explains nothing here
    rec.fault("fault-start", "f0.0", "link.loss", "link:backend-guest16k")
    _flow(rec, [0, 1, 2, 3], [0, 1, 3])
    assert [v.value for v in net.check(rec.history())] == [2]

    rec = Recorder()  # a loss does not excuse a duplicate
    rec.fault("fault-start", "f0.0", "link.loss", target)
    _flow(rec, [0, 1], [0, 0, 1])
    assert "duplicate" in net.check(rec.history())[0].message

    rec = Recorder()
    rec.fault("fault-start", "f0.0", "link.duplicate", target)
    _flow(rec, [0, 1], [0, 0, 1])
    assert net.check(rec.history()) == []


def test_xenstore_checker_register_and_watches() -> None:
    key = "xs:guest4k:data/k1"
    rec = Recorder()
    rec("guest4k/xs", "ok", "xs-watch", "xs:guest4k:data", "registered")
    rec("guest4k/xs", "invoke", "xs-write", key, "v1")
    rec("guest4k/xs", "ok", "xs-write", key, "v1")
    rec("guest4k/xs", "info", "xs-watch", key, "fired")
    rec("guest4k/xs", "invoke", "xs-write", key, "v2")
    rec("guest4k/xs", "ok", "xs-write", key, "v2")
    rec("guest4k/xs", "invoke", "xs-read", key)
    rec("guest4k/xs", "ok", "xs-read", key, "v1")  # stale: v2 was acknowledged
    found = xenstore.check(rec.history())
    messages = sorted(v.message for v in found)
    assert len(found) == 2
    assert messages[0].startswith("no watch event") and messages[1].startswith("stale read")


def _states(rec: Recorder, guest: str, cls: str, name: str, state: int) -> None:
    for end in ("frontend", "backend"):
        rec("toolstack", "info", "state", f"state:{guest}:{cls}:{name}:{end}", state)


def _all_connected(rec: Recorder) -> None:
    for d in rec.schedule.topology.devices:
        _states(rec, d.guest, d.cls, d.name, 4)
        rec("toolstack", "invoke", "probe", d.key)
        rec("toolstack", "ok", "probe", d.key)


def test_liveness_needs_connected_devices_and_a_probe_after_the_last_heal() -> None:
    rec = Recorder()
    _all_connected(rec)
    assert liveness.check(rec.history()) == []

    rec = Recorder()
    rec.fault("fault-start", "f0.0", "process.restart", "domain:backend")
    _all_connected(rec)  # connected and probed before the heal: does not count
    rec.fault("fault-stop", "f0.0", "process.restart", "domain:backend")
    _states(rec, "guest4k", "vbd", "xvda", 5)
    found = liveness.check(rec.history())
    assert any("not Connected" in v.message and v.key == DISK_KEY for v in found)
    assert sum("no probe" in v.message for v in found) == len(rec.schedule.topology.devices)

    rec.clock.tick(100.0)  # recovers, but long after the 5 s bound
    _all_connected(rec)
    found = liveness.check(rec.history())
    assert found and all("after the 5 s bound" in v.message for v in found)


def test_isolation_unaffected_guests_and_backends() -> None:
    rec = Recorder()
    assert set(rec.schedule.unaffected) == {"guest4k", "guest16k", "guest64k"}
    rec("guest16k/blk0", "invoke", "read", "vbd:guest16k:51712:block=0")
    rec("guest16k/blk0", "fail", "read", "vbd:guest16k:51712:block=0", "I/O error")
    rec("toolstack", "info", "state", "domain:backend", "down")
    found = isolation.check(rec.history())
    assert [v.index for v in found] == [2, 3]

    rec = Recorder()
    rec.fault("fault-start", "f0.0", "process.kill", "domain:backend")
    rec("toolstack", "info", "state", "domain:backend", "down")
    assert isolation.check(rec.history()) == []


async def test_check_all_orders_violations_by_index() -> None:
    with trio.fail_after(10):
        rec = Recorder()
        await _drive(AckWithoutKeeping(64 * SECTOR), rec, ops=60)
        found = check_all(rec.history())
        assert found == sorted(found, key=lambda v: (v.index, v.checker))
        assert {v.checker for v in found} >= {"block", "liveness"}


def test_storage_info_is_forwarded() -> None:
    disk = FaultyStorage(MemoryDisk(8 * SECTOR, sector_size=SECTOR))
    assert isinstance(disk.info(), StorageInfo) and disk.info().size == 8 * SECTOR


def test_frame_flow_records_what_the_net_checker_reads() -> None:
    from xenpv.faults.workloads import FrameFlow

    rec = Recorder()
    flow = FrameFlow(rec.writer, VIF_KEY + ":flow=1", 1, "guest4k/tx", "peer/rx", size=64)
    frames = []
    for _ in range(3):
        seq, payload = flow.frame()
        flow.sent(seq)
        frames.append(payload)
    assert flow.received(frames[0]) == 0
    damaged = bytearray(frames[1])
    damaged[40] ^= 1
    assert flow.received(damaged) is None
    assert flow.received(frames[2]) == 2
    found = net.check(rec.history())
    assert found[0].message == "corrupted frame delivered"
    assert found[1].value == 1 and found[1].message.startswith("gap: seq 1")  # it never came


def test_a_read_in_flight_across_a_power_cut_may_see_the_rollback() -> None:
    key = DISK_KEY + ":block=0"
    rec = Recorder()
    rec("w", "invoke", "write", key, "w/0/1")
    rec("w", "ok", "write", key, "w/0/1")
    rec("r", "invoke", "read", key)
    rec.fault("fault-start", "f0.0", "storage.power-cut", DEV)
    rec("r", "ok", "read", key, "initial")
    rec.fault("fault-stop", "f0.0", "storage.power-cut", DEV)
    assert block.check(rec.history()) == []


OP_STRATEGY = st.tuples(
    st.sampled_from(["guest4k/a", "guest16k/b", "nemesis", "toolstack"]),
    st.sampled_from(["invoke", "ok", "fail", "info"]),
    st.sampled_from(list(OPS[1:-1])),
    st.sampled_from(
        [
            DISK_KEY + ":block=0",
            DISK_KEY,
            VIF_KEY + ":flow=1",
            "xs:guest4k:data/k",
            "state:guest4k:vbd:xvda:frontend",
            "domain:backend",
            "link:backend-guest4k",
            "weird",
        ]
    ),
    st.one_of(
        st.none(),
        st.integers(-2, 5),
        st.sampled_from(["initial", "a/0/1", "corrupt: x", "up", "down", "registered", "fired"]),
        st.fixed_dictionaries(
            {
                "id": st.sampled_from(["f0.0", "f1.0"]),
                "kind": st.sampled_from(["link.loss", "storage.power-cut", "process.kill", "nope"]),
                "target": st.sampled_from(["device:guest4k:vbd:xvda", "domain:backend", "x"]),
            }
        ),
        st.lists(st.integers(), max_size=2),
    ),
)


@settings(max_examples=200)
@given(st.lists(OP_STRATEGY, max_size=40))
def test_checkers_never_crash_on_a_well_formed_history(ops: list[tuple[Any, ...]]) -> None:
    rec = Recorder()
    for process, type_, f, key, value in ops:
        rec(process, type_, f, key, value)
    for v in check_all(rec.history()):
        assert v.checker in CHECKERS and isinstance(v.line(), str)


def test_the_report_draws_a_process_lane_for_a_domain_that_went_down() -> None:
    from xenpv.faults.report import render_html

    rec = Recorder()
    rec.fault("fault-start", "f0.0", "process.kill", "domain:guest4k")
    rec("runner", "info", "state", "domain:guest4k", "down")
    rec("runner", "info", "state", "domain:guest4k", "up")
    page = render_html(rec.history(), [])
    assert "guest4k process" in page
    assert "guest16k process" not in page  # only domains that went down get a lane
