"""xenpv's blkif/netif codecs against the installed Xen headers, compiled with gcc at test time.

(a) `abi_layout.c` prints sizeof/offsetof of every struct xenpv encodes; the same numbers are
    derived from xenpv's encoders (the offset of a field is where the encoding changes when
    only that field changes) and must agree.
(b) `abi_encode.c` fills the header structs from Hypothesis-generated field values; xenpv
    encodes the same values; the bytes must be identical, and xenpv decodes C's bytes back to
    the same values.
Both run natively (x86_64-abi / arm-abi layout) and built with -DXENPV_X86_32 (the header
structs under #pragma pack(4): the x86_32-abi layout).
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.abi_strategies import i16, segment_lists, u8, u16, u32, u64
from xenpv.abi import netif, netif_ctrl
from xenpv.abi.blkif import (
    BLKIF_X86_32,
    BLKIF_X86_64,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
    decode_indirect_pages,
    encode_indirect_pages,
    indirect_pages,
)
from xenpv.abi.netif import (
    NETIF_RX_RING,
    NETIF_TX_RING,
    NetifGsoExtra,
    NetifHashExtra,
    NetifMcastExtra,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
)
from xenpv.abi.ring import (
    OFF_REQ_EVENT,
    OFF_REQ_PROD,
    OFF_RSP_EVENT,
    OFF_RSP_PROD,
    SRING_HEADER_SIZE,
)

pytestmark = pytest.mark.headers

C_DIR = Path(__file__).parent / "c"
PROGRAMS = ("abi_layout", "abi_encode", "ring_ops", "netif_ctrl")
VARIANTS = {"native": BLKIF_X86_64, "x86_32": BLKIF_X86_32}


_BUILT: dict[tuple[str, str], Path] = {}  # shared by every module that uses the fixture


@pytest.fixture(scope="session")
def c_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every C program of tests/interop/c, built once per session, native and x86_32."""
    if _BUILT:
        return _BUILT
    out = tmp_path_factory.mktemp("xen-abi-c")
    built = {}
    for name in PROGRAMS:
        for variant in VARIANTS:
            exe = out / f"{name}-{variant}"
            cmd = ["gcc", "-std=gnu11", "-O1", "-Wall", "-Wextra", "-Werror"]
            if variant == "x86_32":
                cmd.append("-DXENPV_X86_32")
            cmd += [str(C_DIR / f"{name}.c"), "-o", str(exe)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stderr}"
            built[name, variant] = exe
    _BUILT.update(built)
    return _BUILT


def run_c(exe: Path, stdin: str) -> list[str]:
    result = subprocess.run([exe], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{exe.name} failed ({result.returncode}): {result.stdout}"
    return result.stdout.splitlines()


# -- (a) layout ---------------------------------------------------------------------------


def _diff(encode: Callable[[int], bytes]) -> int:
    """Offset of the first byte that changes when one field goes from 0 to 1."""
    a, b = encode(0), encode(1)
    assert len(a) == len(b)
    return next(i for i in range(len(a)) if a[i] != b[i])


def _setting(build: Callable[..., bytes], keyword: str) -> Callable[[int], bytes]:
    """`build` with one field, `keyword`, set to the value."""
    return lambda v: build(**{keyword: v})


Table = dict[str, int]


def _first_nonzero(data: bytes) -> int:
    return next(i for i, byte in enumerate(data) if byte)


def python_layout(p: BlkifProtocol) -> dict[str, int]:
    """The numbers abi_layout.c prints, as implied by xenpv's encoders."""
    z = BlkifSegment(0, 0, 0)

    def rw(**kw: Any) -> bytes:
        fields: dict[str, Any] = {"operation": 0, "id": 0, "sector_number": 0, "handle": 0}
        return p.encode_request(BlkifRequest(**(fields | kw)))

    def discard(**kw: Any) -> bytes:
        fields = {"id": 0, "sector_number": 0, "nr_sectors": 0, "flag": 0, "handle": 0}
        return p.encode_request(BlkifDiscardRequest(**(fields | kw)))

    def indirect(**kw: Any) -> bytes:
        fields: dict[str, Any] = {
            "indirect_op": 0,
            "id": 0,
            "sector_number": 0,
            "nr_segments": 0,
            "indirect_grefs": (0,) * 8,
            "handle": 0,
        }
        return p.encode_request(BlkifIndirectRequest(**(fields | kw)))

    def response(**kw: int) -> bytes:
        return p.encode_response(BlkifResponse(**({"id": 0, "operation": 0, "status": 0} | kw)))

    def segment(**kw: int) -> bytes:
        fields = {"gref": 0, "first_sect": 0, "last_sect": 0} | kw
        return encode_indirect_pages([BlkifSegment(**fields)])[0][:8]

    def gso(**kw: int) -> bytes:
        return netif.encode_extra(
            NetifGsoExtra(**({"size": 0, "gso_type": 0, "features": 0, "flags": 0} | kw))
        )

    def hash_(**kw: int) -> bytes:
        fields = {"hash_type": 0, "algorithm": 0, "value": 0, "flags": 0} | kw
        return netif.encode_extra(NetifHashExtra(**fields))

    def tx(**kw: int) -> bytes:
        fields = {"gref": 0, "offset": 0, "flags": 0, "id": 0, "size": 0} | kw
        return netif.encode_tx_request(NetifTxRequest(**fields))

    def tx_rsp(**kw: int) -> bytes:
        return netif.encode_tx_response(NetifTxResponse(**({"id": 0, "status": 0} | kw)))

    def rx_req(**kw: int) -> bytes:
        return netif.encode_rx_request(NetifRxRequest(**({"id": 0, "gref": 0} | kw)))

    def rx_rsp(**kw: int) -> bytes:
        fields = {"id": 0, "offset": 0, "flags": 0, "status": 0} | kw
        return netif.encode_rx_response(NetifRxResponse(**fields))

    def mcast(v: int) -> bytes:
        return netif.encode_extra(NetifMcastExtra(2, bytes([v]) + bytes(5)))

    s, o = "sizeof struct ", "offsetof struct "

    def offsets(struct: str, build: Callable[..., bytes], *fields: str, **named: str) -> Table:
        """offsetof `struct` for each field `build` sets by keyword: `fields` have the
        header's name, `named` maps a keyword to the header's name."""
        return {
            f"{o}{struct} {name}": _diff(_setting(build, keyword))
            for keyword, name in ({f: f for f in fields} | named).items()
        }

    table = {
        s + "blkif_request_segment": len(segment()),
        **offsets("blkif_request_segment", segment, "gref", "first_sect", "last_sect"),
        s + "blkif_request": len(rw()),
        **offsets("blkif_request", rw, "operation", "handle", "id", "sector_number"),
        o + "blkif_request nr_segments": _diff(lambda v: rw(segments=(z,) * v)),
        o + "blkif_request seg": _diff(lambda v: rw(segments=(BlkifSegment(v, 0, 0),))),
        o + "blkif_request seg[1]": _diff(lambda v: rw(segments=(z, BlkifSegment(v, 0, 0)))),
        o + "blkif_request seg[10].last_sect": _diff(
            lambda v: rw(segments=(z,) * 10 + (BlkifSegment(0, 0, v),))
        ),
        # a 32-bit build adds an `#ifdef __i386__` pad (56 -> 64 bytes) that x86_64 gcc
        # under pack(4) does not see; xenpv encodes the real i386 size, with the pad zeroed
        s + "blkif_request_discard": len(discard()),
        o + "blkif_request_discard operation": _first_nonzero(discard()),
        **offsets(
            "blkif_request_discard", discard, "flag", "handle", "id", "sector_number", "nr_sectors"
        ),
        s + "blkif_request_indirect": len(indirect()) - (8 if p is BLKIF_X86_32 else 0),
        o + "blkif_request_indirect operation": _first_nonzero(indirect()),
        **offsets(
            "blkif_request_indirect",
            indirect,
            "indirect_op",
            "nr_segments",
            "id",
            "sector_number",
            "handle",
        ),
        o + "blkif_request_indirect indirect_grefs": _diff(lambda v: indirect(indirect_grefs=(v,))),
        o + "blkif_request_indirect indirect_grefs[7]": _diff(
            lambda v: indirect(indirect_grefs=(0,) * 7 + (v,))
        ),
        s + "blkif_response": len(response()),
        **offsets("blkif_response", response, "id", "operation", "status"),
        s + "netif_tx_request": len(tx()),
        **offsets("netif_tx_request", tx, "gref", "offset", "flags", "id", "size"),
        s + "netif_tx_response": len(tx_rsp()),
        **offsets("netif_tx_response", tx_rsp, "id", "status"),
        s + "netif_rx_request": len(rx_req()),
        **offsets("netif_rx_request", rx_req, "id", "gref"),
        s + "netif_rx_response": len(rx_rsp()),
        **offsets("netif_rx_response", rx_rsp, "id", "offset", "flags", "status"),
        s + "netif_extra_info": len(gso()),
        o + "netif_extra_info type": _first_nonzero(gso()),
        **offsets(
            "netif_extra_info",
            gso,
            "flags",
            size="u.gso.size",
            gso_type="u.gso.type",
            features="u.gso.features",
        ),
        o + "netif_extra_info u.mcast.addr": _diff(mcast),
        **offsets(
            "netif_extra_info",
            hash_,
            hash_type="u.hash.type",
            algorithm="u.hash.algorithm",
            value="u.hash.value",
        ),
        "sizeof union blkif_sring_entry": p.ring_layout.entry_size,
        "sizeof union netif_tx_sring_entry": NETIF_TX_RING.entry_size,
        "sizeof union netif_rx_sring_entry": NETIF_RX_RING.entry_size,
        o + "blkif_sring req_prod": OFF_REQ_PROD,
        o + "blkif_sring req_event": OFF_REQ_EVENT,
        o + "blkif_sring rsp_prod": OFF_RSP_PROD,
        o + "blkif_sring rsp_event": OFF_RSP_EVENT,
        o + "blkif_sring ring": SRING_HEADER_SIZE,
        o + "netif_tx_sring ring": SRING_HEADER_SIZE,
        o + "netif_rx_sring ring": SRING_HEADER_SIZE,
    }
    for pages in range(1, 17):
        size = pages * 4096
        table[f"ringsize blkif {size}"] = p.ring_layout.nr_ents(size)
        table[f"ringsize netif_tx {size}"] = NETIF_TX_RING.nr_ents(size)
        table[f"ringsize netif_rx {size}"] = NETIF_RX_RING.nr_ents(size)
    return table


@pytest.mark.parametrize("variant", VARIANTS)
def test_sizes_and_offsets_match_the_headers(
    c_programs: dict[tuple[str, str], Path], variant: str
) -> None:
    c_table = {}
    for line in run_c(c_programs["abi_layout", variant], ""):
        key, value = line.rsplit(" ", 1)
        c_table[key] = int(value)
    assert len(c_table) > 100
    assert python_layout(VARIANTS[variant]) == c_table


# -- (b) encodings --------------------------------------------------------------------------


@dataclass
class Sample:
    """One struct: the line abi_encode.c reads, the value, and how xenpv codes it."""

    c_line: str
    value: Any
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


@st.composite
def blkif_samples(draw: st.DrawFn, p: BlkifProtocol) -> Sample:
    kind = draw(st.sampled_from(["rw", "discard", "indirect", "segment", "rsp"]))
    if kind == "rw":
        op = draw(st.integers(0, 3))
        segs = draw(segment_lists(1 if op < 2 else 0, 11))
        req = BlkifRequest(op, draw(u64), draw(u64), segs, draw(u16))
        fields = [op, len(segs), req.handle, req.id, req.sector_number]
        for seg in segs:
            fields += (seg.gref, seg.first_sect, seg.last_sect)
        return Sample(f"rw {' '.join(map(str, fields))}", req, p.encode_request, p.decode_request)
    if kind == "discard":
        d = BlkifDiscardRequest(draw(u64), draw(u64), draw(u64), draw(u8), draw(u16))
        line = f"discard {d.flag} {d.handle} {d.id} {d.sector_number} {d.nr_sectors}"
        return Sample(line, d, p.encode_request, p.decode_request)
    if kind == "indirect":
        nr = draw(st.integers(1, 4096))
        grefs = tuple(draw(u32) for _ in range(indirect_pages(nr)))
        r = BlkifIndirectRequest(
            draw(st.integers(0, 1)), draw(u64), draw(u64), nr, grefs, draw(u16)
        )
        padded = grefs + (0,) * (8 - len(grefs))
        line = f"indirect {r.indirect_op} {nr} {r.id} {r.sector_number} {r.handle} " + " ".join(
            map(str, padded)
        )
        return Sample(
            line,
            r,
            p.encode_request,
            lambda data: p.decode_request(data, max_indirect_segments=4096),
        )
    if kind == "segment":
        seg = draw(segment_lists(1, 1))[0]

        def decode_segment(data: bytes) -> BlkifSegment:
            req = BlkifIndirectRequest(0, 0, 0, 1, (0,))
            return decode_indirect_pages([data + bytes(4088)], req)[0]

        return Sample(
            f"segment {seg.gref} {seg.first_sect} {seg.last_sect}",
            seg,
            lambda s: encode_indirect_pages([s])[0][:8],
            decode_segment,
        )
    rsp = BlkifResponse(draw(u64), draw(u8), draw(i16))
    return Sample(
        f"rsp {rsp.id} {rsp.operation} {rsp.status}", rsp, p.encode_response, p.decode_response
    )


@st.composite
def netif_samples(draw: st.DrawFn) -> Sample:
    kind = draw(st.sampled_from(["txreq", "txrsp", "rxreq", "rxrsp", "gso", "mcast", "hash"]))
    if kind == "txreq":
        t = NetifTxRequest(draw(u32), draw(u16), draw(u16), draw(u16), draw(u16))
        line = f"txreq {t.gref} {t.offset} {t.flags} {t.id} {t.size}"
        return Sample(line, t, netif.encode_tx_request, netif.decode_tx_request)
    if kind == "txrsp":
        tr = NetifTxResponse(draw(u16), draw(i16))
        return Sample(
            f"txrsp {tr.id} {tr.status}", tr, netif.encode_tx_response, netif.decode_tx_response
        )
    if kind == "rxreq":
        r = NetifRxRequest(draw(u16), draw(u32))
        return Sample(f"rxreq {r.id} {r.gref}", r, netif.encode_rx_request, netif.decode_rx_request)
    if kind == "rxrsp":
        offset = draw(st.integers(0, 4095))
        rr = NetifRxResponse(draw(u16), offset, draw(u16), draw(st.integers(-2, 4096 - offset)))
        line = f"rxrsp {rr.id} {rr.offset} {rr.flags} {rr.status}"
        return Sample(line, rr, netif.encode_rx_response, netif.decode_rx_response)
    if kind == "gso":
        g = NetifGsoExtra(
            draw(st.integers(1, 0xFFFF)), draw(st.integers(1, 2)), draw(u16), draw(u8)
        )
        line = f"gso {g.flags} {g.size} {g.gso_type} {g.features}"
        return Sample(line, g, netif.encode_extra, netif.decode_extra)
    if kind == "mcast":
        m = NetifMcastExtra(
            draw(st.integers(2, 3)), draw(st.binary(min_size=6, max_size=6)), draw(u8)
        )
        line = f"mcast {m.type} {m.flags} " + " ".join(map(str, m.addr))
        return Sample(line, m, netif.encode_extra, netif.decode_extra)
    h = NetifHashExtra(draw(st.integers(0, 3)), draw(st.integers(0, 1)), draw(u32), draw(u8))
    line = f"hash {h.flags} {h.hash_type} {h.algorithm} {h.value}"
    return Sample(line, h, netif.encode_extra, netif.decode_extra)


def _check_samples(exe: Path, samples: list[Sample], p: BlkifProtocol) -> None:
    lines = run_c(exe, "".join(s.c_line + "\n" for s in samples))
    assert len(lines) == len(samples)
    for sample, line in zip(samples, lines, strict=True):
        c_bytes = bytes.fromhex(line)
        ours = sample.encode(sample.value)
        if p is BLKIF_X86_32 and isinstance(sample.value, BlkifIndirectRequest):
            assert ours[56:] == bytes(8)  # the i386 tail pad (see python_layout)
            ours = ours[:56]
        assert ours == c_bytes, f"{sample.c_line}\n C:  {line}\n py: {ours.hex()}"
        assert sample.decode(c_bytes) == sample.value, sample.c_line


def _samples(p: BlkifProtocol) -> st.SearchStrategy[list[Sample]]:
    one = blkif_samples(p) if p is BLKIF_X86_32 else st.one_of(blkif_samples(p), netif_samples())
    return st.lists(one, min_size=1, max_size=30)


@pytest.mark.parametrize("variant", VARIANTS)
def test_encodings_match_the_headers(c_programs: dict[tuple[str, str], Path], variant: str) -> None:
    p = VARIANTS[variant]
    exe = c_programs["abi_encode", variant]

    @given(_samples(p))
    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    def check(samples: list[Sample]) -> None:
        _check_samples(exe, samples, p)

    check()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_opcode_and_struct_once(
    c_programs: dict[tuple[str, str], Path], variant: str
) -> None:
    """A fixed sample of each kind (so a shrunk Hypothesis run can never skip one)."""
    p = VARIANTS[variant]
    seg = BlkifSegment(0xDEADBEEF, 1, 6)
    samples = [
        Sample(
            f"rw {op} 2 51712 {2**64 - 1} 123456789 3735928559 1 6 7 0 7",
            BlkifRequest(op, 2**64 - 1, 123456789, (seg, BlkifSegment(7, 0, 7)), 51712),
            p.encode_request,
            p.decode_request,
        )
        for op in range(4)
    ]
    samples.append(
        Sample("rw 3 0 0 5 0", BlkifRequest(3, 5, 0, (), 0), p.encode_request, p.decode_request)
    )
    samples.append(
        Sample(
            "discard 1 7 9 4096 8192",
            BlkifDiscardRequest(9, 4096, 8192, 1, 7),
            p.encode_request,
            p.decode_request,
        )
    )
    samples.append(
        Sample(
            "indirect 1 1024 77 88 3 11 12 0 0 0 0 0 0",
            BlkifIndirectRequest(1, 77, 88, 1024, (11, 12), 3),
            p.encode_request,
            lambda data: p.decode_request(data, max_indirect_segments=1024),
        )
    )
    for status in (0, -1, -2):
        samples.append(
            Sample(
                f"rsp 42 1 {status}",
                BlkifResponse(42, 1, status),
                p.encode_response,
                p.decode_response,
            )
        )
    _check_samples(c_programs["abi_encode", variant], samples, p)


# -- (c) the netif control ring -------------------------------------------------------------


def _ctrl_c_table(exe: Path, stdin: str) -> tuple[dict[str, int], list[str]]:
    """netif_ctrl.c's layout/constant lines (up to `end`) and its answers to `stdin`."""
    lines = run_c(exe, stdin)
    end = lines.index("end")
    table = {}
    for line in lines[:end]:
        key, value = line.rsplit(" ", 1)
        table[key] = int(value)
    return table, lines[end + 1 :]


def python_ctrl_layout() -> dict[str, int]:
    def req(**kw: Any) -> bytes:
        fields: dict[str, Any] = {"id": 0, "type": 0, "data": (0, 0, 0)} | kw
        return netif_ctrl.encode_request(netif_ctrl.CtrlRequest(**fields))

    def rsp(**kw: int) -> bytes:
        fields = {"id": 0, "type": 0, "status": 0, "data": 0} | kw
        return netif_ctrl.encode_response(netif_ctrl.CtrlResponse(**fields))

    s, o = "sizeof struct ", "offsetof struct "
    ring = netif_ctrl.NETIF_CTRL_RING
    table = {
        s + "xen_netif_ctrl_request": len(req()),
        o + "xen_netif_ctrl_request id": _diff(lambda v: req(id=v)),
        o + "xen_netif_ctrl_request type": _diff(lambda v: req(type=v)),
        o + "xen_netif_ctrl_request data": _diff(lambda v: req(data=(v, 0, 0))),
        o + "xen_netif_ctrl_request data[1]": _diff(lambda v: req(data=(0, v, 0))),
        o + "xen_netif_ctrl_request data[2]": _diff(lambda v: req(data=(0, 0, v))),
        s + "xen_netif_ctrl_response": len(rsp()),
        o + "xen_netif_ctrl_response id": _diff(lambda v: rsp(id=v)),
        o + "xen_netif_ctrl_response type": _diff(lambda v: rsp(type=v)),
        o + "xen_netif_ctrl_response status": _diff(lambda v: rsp(status=v)),
        o + "xen_netif_ctrl_response data": _diff(lambda v: rsp(data=v)),
        "sizeof union xen_netif_ctrl_sring_entry": ring.entry_size,
        o + "xen_netif_ctrl_sring ring": SRING_HEADER_SIZE,
        "ringsize 4096": ring.nr_ents(4096),
        "ringsize 16384": ring.nr_ents(16384),
    }
    for enum, prefix in (
        (netif_ctrl.CtrlType, "XEN_NETIF_CTRL_TYPE_"),
        (netif_ctrl.CtrlStatus, "XEN_NETIF_CTRL_STATUS_"),
        (netif_ctrl.HashFlags, "XEN_NETIF_CTRL_HASH_TYPE_"),
        (netif_ctrl.HashAlgorithm, "XEN_NETIF_CTRL_HASH_ALGORITHM_"),
    ):
        for member in enum:  # type: ignore[attr-defined]
            table[f"const {prefix}{member.name}"] = int(member.value)
    return table


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctrl_ring_layout_and_constants_match_the_header(
    c_programs: dict[tuple[str, str], Path], variant: str
) -> None:
    c_table, _ = _ctrl_c_table(c_programs["netif_ctrl", variant], "")
    assert len(c_table) == 36
    assert python_ctrl_layout() == c_table


ctrl_requests = st.builds(netif_ctrl.CtrlRequest, u16, u16, st.tuples(u32, u32, u32))
ctrl_responses = st.builds(netif_ctrl.CtrlResponse, u16, u16, u32, u32)
hash_cases = st.tuples(st.binary(max_size=48), st.binary(max_size=64))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(ctrl_requests, min_size=1, max_size=20),
    responses=st.lists(ctrl_responses, min_size=1, max_size=20),
    hashes=st.lists(hash_cases, min_size=1, max_size=20),
)
def test_ctrl_messages_and_toeplitz_match_the_header(
    c_programs: dict[tuple[str, str], Path],
    requests: list[netif_ctrl.CtrlRequest],
    responses: list[netif_ctrl.CtrlResponse],
    hashes: list[tuple[bytes, bytes]],
) -> None:
    lines = [f"req {r.id} {r.type} {r.data[0]} {r.data[1]} {r.data[2]}" for r in requests]
    lines += [f"rsp {r.id} {r.type} {r.status} {r.data}" for r in responses]
    lines += [f"hash {k.hex() or '-'} {d.hex() or '-'}" for k, d in hashes]
    _, answers = _ctrl_c_table(c_programs["netif_ctrl", "native"], "\n".join(lines) + "\n")
    expected = [netif_ctrl.encode_request(r).hex() for r in requests]
    expected += [netif_ctrl.encode_response(r).hex() for r in responses]
    expected += [str(netif_ctrl.toeplitz_hash(k, d)) for k, d in hashes]
    assert answers == expected
    for request in requests:  # and xenpv decodes C's bytes back
        assert netif_ctrl.decode_request(bytes.fromhex(answers[requests.index(request)])) == request


def test_hash_settings_steer_by_the_headers_toeplitz(
    c_programs: dict[tuple[str, str], Path],
) -> None:
    """Hash settings made through control requests (as a frontend sends them, with the key
    and mapping in granted pages) steer frames to the queue the header's Toeplitz picks."""
    key = bytes(range(1, 41))
    mapping = [3, 1, 2, 0, 1, 1, 2, 3]
    pages = {7: key, 8: struct.pack(f"<{len(mapping)}I", *mapping)}
    settings_ = netif_ctrl.HashSettings(num_queues=4)

    T = netif_ctrl.CtrlType
    for id_, (kind, data) in enumerate(
        [
            (T.SET_HASH_ALGORITHM, (netif_ctrl.HashAlgorithm.TOEPLITZ, 0, 0)),
            (T.SET_HASH_FLAGS, (int(netif_ctrl.ALL_HASH_FLAGS), 0, 0)),
            (T.SET_HASH_KEY, (7, len(key), 0)),
            (T.SET_HASH_MAPPING_SIZE, (len(mapping), 0, 0)),
            (T.SET_HASH_MAPPING, (8, len(mapping), 0)),
        ]
    ):
        request = netif_ctrl.CtrlRequest(id_, kind, data)
        needed = settings_.grant_needed(request)
        granted = None if needed is None else pages[needed[0]][: needed[1]]
        response = settings_.handle(request, granted)
        assert response == netif_ctrl.CtrlResponse(id_, kind, netif_ctrl.CtrlStatus.SUCCESS, 0)

    frames = [
        # IPv4/TCP 10.0.0.1:1234 -> 10.0.0.2:80
        bytes(12) + b"\x08\x00" + bytes.fromhex("4500002800004000400600000a0000010a000002")
        + (1234).to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(16),
        # IPv4/UDP: addresses only
        bytes(12) + b"\x08\x00" + bytes.fromhex("4500001c00004000401100000a0000010a000003")
        + bytes(8),
        # IPv6/TCP
        bytes(12) + b"\x86\xdd" + bytes.fromhex("60000000001406ff") + bytes(range(32))
        + (443).to_bytes(2, "big") + (5555).to_bytes(2, "big") + bytes(16),
    ]  # fmt: skip
    inputs = [netif_ctrl.hash_input(f, netif_ctrl.ALL_HASH_FLAGS) for f in frames]
    assert [kind for _, kind in inputs] == [  # type: ignore[misc]
        netif_ctrl.HashFlags.IPV4_TCP,
        netif_ctrl.HashFlags.IPV4,
        netif_ctrl.HashFlags.IPV6_TCP,
    ]
    stdin = "".join(f"hash {key.hex()} {data.hex()}\n" for data, _ in inputs)  # type: ignore[misc]
    _, answers = _ctrl_c_table(c_programs["netif_ctrl", "native"], stdin)
    for frame, answer in zip(frames, answers, strict=True):
        assert settings_.steer(frame) == mapping[int(answer) % len(mapping)]
