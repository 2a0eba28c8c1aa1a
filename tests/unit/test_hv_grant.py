"""The grant table, sans-IO: entry layout, permission checks, pins, and a model-based test."""

from __future__ import annotations

import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenpv.hv import GNTST, GTF, GrantError, GrantTable
from xenpv.hv.gntst import GNTTAB_NR_RESERVED_ENTRIES
from xenpv.hv.grant import GRANT_ENTRY_SIZE, check_entry

NR = 64
FRAMES = 32


def table() -> tuple[GrantTable, memoryview]:
    raw = memoryview(bytearray(NR * GRANT_ENTRY_SIZE))
    return GrantTable(1, raw, NR, FRAMES), raw


def test_entry_is_byte_exact_grant_entry_v1() -> None:
    grants, raw = table()
    gref = grants.grant_access(0x7, 0x1234 % FRAMES, readonly=True)
    assert gref == GNTTAB_NR_RESERVED_ENTRIES
    flags, domid, frame = struct.unpack_from("<HHI", raw, gref * 8)
    assert flags == GTF.GTF_permit_access | GTF.GTF_readonly
    assert (domid, frame) == (7, 0x1234 % FRAMES)


def test_check_matrix() -> None:
    grants, raw = table()
    rw = grants.grant_access(0, 3)
    ro = grants.grant_access(0, 4, readonly=True)
    ok = GNTST.GNTST_okay
    general = GNTST.GNTST_general_error
    assert check_entry(raw, NR, rw, 0, True) == (ok, 3, 1)
    assert check_entry(raw, NR, rw, 2, False)[0] == general  # not the grantee
    assert check_entry(raw, NR, ro, 0, False) == (ok, 4, 1)
    assert check_entry(raw, NR, ro, 0, True)[0] == general  # write to read-only
    assert check_entry(raw, NR, 3, 0, False)[0] == general  # never granted
    assert check_entry(raw, NR, NR, 0, False)[0] == GNTST.GNTST_bad_gntref
    assert check_entry(raw, NR, -1, 0, False)[0] == GNTST.GNTST_bad_gntref
    grants.end_access(rw)
    assert check_entry(raw, NR, rw, 0, True)[0] == general  # ended


def test_pins_set_reading_writing_and_block_end_access() -> None:
    grants, _ = table()
    gref = grants.grant_access(0, 1)
    assert grants.pin(gref, 0, readonly=True)[0] == GNTST.GNTST_okay
    assert grants.entry(gref).flags & GTF.GTF_reading
    assert not grants.entry(gref).flags & GTF.GTF_writing
    assert grants.pin(gref, 0, readonly=False)[0] == GNTST.GNTST_okay
    assert grants.entry(gref).flags & GTF.GTF_writing
    with pytest.raises(GrantError) as err:
        grants.end_access(gref)
    assert err.value.status == GNTST.GNTST_eagain
    grants.unpin(gref, readonly=False)
    assert not grants.entry(gref).flags & GTF.GTF_writing
    grants.unpin(gref, readonly=True)
    grants.end_access(gref)
    assert grants.entry(gref).flags == 0


def test_grant_argument_errors() -> None:
    grants, _ = table()
    with pytest.raises(GrantError) as err:
        grants.grant_access(1, 0)  # to itself
    assert err.value.status == GNTST.GNTST_bad_domain
    with pytest.raises(GrantError) as err:
        grants.grant_access(0, FRAMES)
    assert err.value.status == GNTST.GNTST_bad_page
    with pytest.raises(GrantError):
        grants.grant_access(0, 1, order=2)  # misaligned granule
    with pytest.raises(GrantError):
        grants.grant_access(0, 0, order=5)
    gref = grants.grant_access(0, 4, order=2)
    assert grants.check(gref, 0, False) == (GNTST.GNTST_okay, 4, 4)
    for _ in range(NR - GNTTAB_NR_RESERVED_ENTRIES - 1):
        grants.grant_access(0, 0)
    with pytest.raises(GrantError) as err:
        grants.grant_access(0, 0)
    assert err.value.status == GNTST.GNTST_no_space
    with pytest.raises(GrantError) as err:
        grants.end_access(3)
    assert err.value.status == GNTST.GNTST_bad_gntref


class GrantModel(RuleBasedStateMachine):
    """Grant, pin, unpin, end in any order: the table agrees with a dictionary model."""

    def __init__(self) -> None:
        super().__init__()
        self.grants, self.raw = table()
        self.model: dict[int, tuple[int, int, bool]] = {}  # gref -> (domid, frame, ro)
        self.pins: dict[int, list[int]] = {}

    @rule(
        domid=st.integers(0, 3).filter(lambda d: d != 1),
        frame=st.integers(0, FRAMES - 1),
        readonly=st.booleans(),
    )
    def grant(self, domid: int, frame: int, readonly: bool) -> None:
        if len(self.model) == NR - GNTTAB_NR_RESERVED_ENTRIES:
            with pytest.raises(GrantError):
                self.grants.grant_access(domid, frame, readonly=readonly)
            return
        gref = self.grants.grant_access(domid, frame, readonly=readonly)
        assert gref not in self.model
        self.model[gref] = (domid, frame, readonly)
        self.pins[gref] = [0, 0]

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), requester=st.integers(0, 3), readonly=st.booleans())
    def pin(self, data: st.DataObject, requester: int, readonly: bool) -> None:
        gref = data.draw(st.sampled_from(sorted(self.model)))
        domid, frame, ro = self.model[gref]
        status, got, _n = self.grants.pin(gref, requester, readonly)
        if requester == domid and (readonly or not ro):
            assert status == GNTST.GNTST_okay and got == frame
            self.pins[gref][0 if readonly else 1] += 1
        else:
            assert status == GNTST.GNTST_general_error

    @precondition(lambda self: any(sum(p) for p in self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        gref = data.draw(st.sampled_from(sorted(g for g, p in self.pins.items() if sum(p))))
        pins = self.pins[gref]
        readonly = pins[0] > 0 if pins[1] == 0 else (pins[0] > 0 and data.draw(st.booleans()))
        self.grants.unpin(gref, readonly)
        pins[0 if readonly else 1] -= 1

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        gref = data.draw(st.sampled_from(sorted(self.model)))
        if sum(self.pins[gref]):
            with pytest.raises(GrantError):
                self.grants.end_access(gref)
        else:
            self.grants.end_access(gref)
            del self.model[gref]
            del self.pins[gref]

    @invariant()
    def entries_match(self) -> None:
        for gref in range(NR):
            entry = self.grants.entry(gref)
            if gref not in self.model:
                assert entry.flags == 0
                continue
            domid, frame, ro = self.model[gref]
            reads, writes = self.pins[gref]
            assert (entry.domid, entry.frame) == (domid, frame)
            assert bool(entry.flags & GTF.GTF_readonly) == ro
            assert bool(entry.flags & GTF.GTF_reading) == bool(reads or writes)
            assert bool(entry.flags & GTF.GTF_writing) == bool(writes)
        assert self.grants.in_use() == len(self.model)


TestGrantModel = GrantModel.TestCase
TestGrantModel.settings = settings(max_examples=60, stateful_step_count=40)
