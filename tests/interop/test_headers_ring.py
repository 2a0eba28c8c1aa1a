"""xenpv's rings against ring.h's macros, step by step: the same steps through both must
leave identical bytes and decisions.

Hypothesis generates a ring (blkif, netif tx, netif rx, blkif x86_32; 1..16 pages; a fresh
SHARED_RING_INIT or a live ring attached near the 2**32 wrap) and a sequence of operations.
xenpv runs them first (which also makes each abstract step concrete: how many requests fit,
what payload bytes); then `ring_ops.c` runs the same concrete steps through
XEN_FRONT_RING_INIT / BACK_RING_INIT / *_ATTACH, RING_PUSH_*_AND_CHECK_NOTIFY,
RING_FINAL_CHECK_FOR_*, RING_COPY_*, and prints, after every step, the step's result (notify
decision, work-to-do, copied bytes), RING_FREE_REQUESTS, RING_FULL, both unconsumed counts,
RING_REQUEST_CONS_OVERFLOW, all four private indexes and the CRC-32 of the whole shared
buffer. Every line must match.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.interop.test_headers_structs import c_programs, run_c
from xenpv.abi.blkif import BLKIF_RING, BLKIF_X86_32
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.netif import NETIF_RX_RING, NETIF_TX_RING
from xenpv.abi.ring import BackRing, FrontRing, RingLayout

pytestmark = pytest.mark.headers

__all__ = ["c_programs"]  # the session fixture that builds the C programs

MASK = 0xFFFFFFFF

# ring name -> (C program variant, tag given to ring_ops.c, layout)
RINGS: dict[str, tuple[str, str, RingLayout]] = {
    "blkif": ("native", "blkif", BLKIF_RING),
    "netif_tx": ("native", "netif_tx", NETIF_TX_RING),
    "netif_rx": ("native", "netif_rx", NETIF_RX_RING),
    "blkif_x86_32": ("x86_32", "blkif", BLKIF_X86_32.ring_layout),
}

OPS = ("req", "pushreq", "takereq", "finalreq", "rsp", "pushrsp", "takersp", "finalrsp")


@dataclass
class Scenario:
    pages: int
    fill: int
    start: int | None  # None: init; else attach a live ring at this index
    steps: list[tuple[str, int, int]] = field(default_factory=list)  # (op, count, seed)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    start = draw(
        st.one_of(
            st.none(),
            st.integers(MASK - 200, MASK),  # wraps within the sequence
            st.integers(0, MASK),
        )
    )
    steps = draw(
        st.lists(
            st.tuples(st.sampled_from(OPS), st.integers(1, 40), st.integers(0, 2**32)),
            min_size=10,
            max_size=80,
        )
    )
    return Scenario(draw(st.integers(1, 16)), draw(st.integers(0, 255)), start, steps)


class PyRun:
    """The xenpv side: runs steps, records concrete C input lines and expected output."""

    def __init__(self, layout: RingLayout, scenario: Scenario) -> None:
        size = scenario.pages * 4096
        self.layout = layout
        self.buffer = LocalBuffer(data=bytes([scenario.fill]) * size)
        self.lines: list[str] = []
        self.expected: list[str] = []
        if scenario.start is None:
            self.front = FrontRing(self.buffer, layout)
            self.back = BackRing(self.buffer, layout)
            self._record("init", "-")
        else:
            i = scenario.start
            struct.pack_into("<IIII", self.buffer.view, 0, i, (i + 1) & MASK, i, (i + 1) & MASK)
            self.front = FrontRing(self.buffer, layout, attach=True, index=i)
            self.back = BackRing(self.buffer, layout, attach=True, index=i)
            self._record(f"attach {i}", "-")

    def _record(self, line: str, result: str) -> None:
        f, b = self.front, self.back
        self.lines.append(line)
        self.expected.append(
            f"{result} free={f.free_requests()} full={int(f.full())} "
            f"ureq={b.unconsumed_requests()} ursp={f.unconsumed_responses()} "
            f"consovf={int(b.request_cons_overflow(b.req_cons))} "
            f"f={f.req_prod_pvt},{f.rsp_cons} b={b.req_cons},{b.rsp_prod_pvt} "
            f"crc={zlib.crc32(self.buffer.view):08x}"
        )

    def step(self, op: str, count: int, seed: int) -> None:
        rng = random.Random(seed)
        f, b = self.front, self.back
        if op == "req":
            for _ in range(min(count, f.free_requests())):
                data = rng.randbytes(rng.randint(1, self.layout.req_size))
                f.put_request(data)
                self._record(f"req {data.hex()}", "-")
        elif op == "rsp":
            for _ in range(min(count, (b.req_cons - b.rsp_prod_pvt) & MASK)):
                data = rng.randbytes(rng.randint(1, self.layout.rsp_size))
                b.put_response(data)
                self._record(f"rsp {data.hex()}", "-")
        elif op in ("takereq", "takersp"):
            take = b.take_request if op == "takereq" else f.take_response
            for _ in range(count):
                data = take()
                self._record(op, "none" if data is None else data.hex())
                if data is None:
                    break
        elif op == "pushreq":
            self._record(op, str(int(f.push_requests())))
        elif op == "pushrsp":
            self._record(op, str(int(b.push_responses())))
        elif op == "finalreq":
            self._record(op, str(int(b.final_check_for_requests())))
        else:
            self._record(op, str(int(f.final_check_for_responses())))


@pytest.mark.parametrize("ring", RINGS)
def test_ring_operations_match_the_c_macros(
    c_programs: dict[tuple[str, str], Path], ring: str
) -> None:
    variant, tag, layout = RINGS[ring]
    exe = c_programs["ring_ops", variant]

    @given(scenarios())
    @settings(
        max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    def check(scenario: Scenario) -> None:
        py = PyRun(layout, scenario)
        for step in scenario.steps:
            py.step(*step)
        header = f"{tag} {scenario.pages * 4096} {scenario.fill}\n"
        got = run_c(exe, header + "".join(line + "\n" for line in py.lines))
        assert len(got) == len(py.expected)
        for n, (line, c_out, py_out) in enumerate(zip(py.lines, got, py.expected, strict=True)):
            assert c_out == py_out, f"step {n}: {line[:60]}\n C:  {c_out}\n py: {py_out}"

    check()


def test_a_long_wrapping_run_matches(c_programs: dict[tuple[str, str], Path]) -> None:
    """A deterministic run across the wrap with every operation (Hypothesis may shrink away)."""
    scenario = Scenario(pages=2, fill=0xA5, start=MASK - 70)
    for round_ in range(6):
        scenario.steps += [
            ("req", 40, round_),
            ("pushreq", 1, 0),
            ("takereq", 50, 0),
            ("finalreq", 1, 0),
            ("rsp", 64, round_),
            ("pushrsp", 1, 0),
            ("takersp", 70, 0),
            ("finalrsp", 1, 0),
        ]
    py = PyRun(BLKIF_RING, scenario)
    for step in scenario.steps:
        py.step(*step)
    assert py.front.req_prod_pvt < 1000  # wrapped
    header = f"blkif {scenario.pages * 4096} {scenario.fill}\n"
    assert run_c(c_programs["ring_ops", "native"], header + "\n".join(py.lines) + "\n") == (
        py.expected
    )
