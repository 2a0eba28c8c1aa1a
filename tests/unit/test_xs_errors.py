"""Every malformed request gets the documented errno; DIRECTORY_PART paging; E2BIG."""

from __future__ import annotations

import pytest

from tests.unit.xs_helpers import Client
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import Message, XsType


@pytest.mark.parametrize("mtype", [XsType.XS_WATCH_EVENT, XsType.XS_ERROR, 20, 23, 0xFFFF, 999])
def test_unknown_or_server_only_types_are_enosys(mtype: int) -> None:
    assert Client(Store(), 0).err(mtype, b"/\0") == "ENOSYS"
    assert Client(Store(), 3).err(mtype, b"/\0") == "ENOSYS"


@pytest.mark.parametrize(
    ("mtype", "payload"),
    [
        (XsType.XS_READ, b""),
        (XsType.XS_READ, b"/a"),  # no NUL
        (XsType.XS_READ, b"/a\0/b\0"),  # two arguments
        (XsType.XS_READ, b"/a/\0"),
        (XsType.XS_READ, b"//a\0"),
        (XsType.XS_READ, b"/a b\0"),
        (XsType.XS_READ, b"/\xff\0"),
        (XsType.XS_READ, b"@releaseDomain\0"),
        (XsType.XS_READ, b"\0"),
        (XsType.XS_WRITE, b""),
        (XsType.XS_WRITE, b"no-nul-at-all"),
        (XsType.XS_MKDIR, b"/a/\0"),
        (XsType.XS_RM, b"/a//b\0"),
        (XsType.XS_DIRECTORY, b"/a\0x\0"),
        (XsType.XS_DIRECTORY_PART, b"/\0"),
        (XsType.XS_DIRECTORY_PART, b"/\0x\0"),
        (XsType.XS_DIRECTORY_PART, b"/\x000\x000\0"),
        (XsType.XS_GET_PERMS, b"/a/\0"),
        (XsType.XS_SET_PERMS, b"/\0"),
        (XsType.XS_TRANSACTION_END, b"\0"),
        (XsType.XS_GET_DOMAIN_PATH, b"-1\0"),
        (XsType.XS_GET_DOMAIN_PATH, b""),
    ],
)
def test_einval(mtype: int, payload: bytes) -> None:
    assert Client(Store(), 0).err(mtype, payload) == "EINVAL"


def test_path_length_limits() -> None:
    dom0 = Client(Store(), 0)
    guest = Client(dom0.store, 1)
    abs_ok = "/" + "a" * 3071
    assert dom0.err(XsType.XS_READ, abs_ok.encode() + b"\0") == "ENOENT"
    assert dom0.err(XsType.XS_READ, abs_ok.encode() + b"a\0") == "EINVAL"
    assert guest.err(XsType.XS_READ, b"r" * 2048 + b"\0") == "EACCES"  # valid, not readable
    assert guest.err(XsType.XS_READ, b"r" * 2049 + b"\0") == "EINVAL"


def test_relative_path_refused_when_it_would_exceed_absolute_limit() -> None:
    guest = Client(Store(), 12345)
    assert guest.err(XsType.XS_READ, b"r" * 2048 + b"\0") == "EACCES"


def test_directory_e2big_and_directory_part_paging() -> None:
    dom0 = Client(Store(), 0)
    names = [f"child-{i:04d}-" + "x" * 40 for i in range(200)]
    for name in names:
        dom0.write(f"/big/{name}", b"")
    assert dom0.err(XsType.XS_DIRECTORY, b"/big\0") == "E2BIG"
    collected = b""
    offset = 0
    generations = set()
    while True:
        part = dom0.ok(XsType.XS_DIRECTORY_PART, f"/big\0{offset}\0".encode())
        assert len(part) <= 4096
        gen, _, rest = part.partition(b"\0")
        generations.add(gen)
        if rest.endswith(b"\0\0") or rest == b"\0":
            collected += rest[:-1]
            break
        collected += rest
        offset += len(rest)
    assert len(generations) == 1
    assert collected.split(b"\0")[:-1] == [n.encode() for n in names]
    end = dom0.ok(XsType.XS_DIRECTORY_PART, b"/big\x0099999\0")
    assert end == gen + b"\0\0"


def test_directory_part_small() -> None:
    dom0 = Client(Store(), 0)
    dom0.write("/s/a", b"")
    dom0.write("/s/bb", b"")
    part = dom0.ok(XsType.XS_DIRECTORY_PART, b"/s\x000\0")
    gen = part.split(b"\0")[0]
    assert part == gen + b"\0a\0bb\0\0"
    assert dom0.ok(XsType.XS_DIRECTORY_PART, b"/s\x002\0") == gen + b"\0bb\0\0"
    assert dom0.ok(XsType.XS_DIRECTORY_PART, b"/s\x005\0") == gen + b"\0\0"
    empty = dom0.ok(XsType.XS_DIRECTORY_PART, b"/s/a\x000\0")
    assert empty.endswith(b"\0\0")


def test_get_perms_reply_too_big() -> None:
    dom0 = Client(Store(), 0)
    dom0.write("/p", b"")
    perms = [f"r{d}" for d in range(1000, 1800)]
    dom0.set_perms("/p", "n0", *perms)
    assert dom0.err(XsType.XS_GET_PERMS, b"/p\0") == "E2BIG"


def test_request_ids_are_echoed_on_errors() -> None:
    store = Store()
    conn = store.connect(0)
    out = store.handle(conn, Message(XsType.XS_READ, 0xDEADBEEF, 0, b"/nope\0"))
    assert out.replies == [(conn, Message(XsType.XS_ERROR, 0xDEADBEEF, 0, b"ENOENT\0"))]
    out = store.handle(conn, Message(XsType.XS_READ, 1, 42, b"/\0"))
    assert out.replies == [(conn, Message(XsType.XS_ERROR, 1, 42, b"ENOENT\0"))]


def test_internal_bug_becomes_eio(monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    dom0 = Client(store, 0)

    def boom(*args: object) -> bytes:
        raise RuntimeError("bug")

    monkeypatch.setitem(
        __import__("xenpv.xenstore.store", fromlist=["_HANDLERS"])._HANDLERS,
        XsType.XS_READ,
        (boom, 0),
    )
    assert dom0.err(XsType.XS_READ, b"/\0") == "EIO"
    dom0.write("/still", b"works")
