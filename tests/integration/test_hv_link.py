"""Domain links: mutual proof of domid, hostile dialers, transports, and the fault seam."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from tests.integration.hv_pair import domains
from xenpv.hv import (
    GNTST,
    CopyDirection,
    CopyOp,
    Domain,
    EventChannelClosed,
    LinkError,
    Message,
    Msg,
    PeerGone,
    StaticDirectory,
    Verdict,
    handshake,
    open_domain,
)
from xenpv.hv import link as link_module
from xenpv.identity import DomainKey


async def test_wrong_key_and_wrong_domid_are_refused(tmp_path: Path) -> None:
    with trio.fail_after(20):
        directory = StaticDirectory()
        k0, k1, impostor = (DomainKey.generate(0), DomainKey.generate(1), DomainKey.generate(1))
        async with (
            open_domain(domid=0, key=k0, directory=directory, endpoint=f"unix:{tmp_path}/0") as d0,
            open_domain(
                domid=1, key=impostor, directory=directory, endpoint=f"unix:{tmp_path}/1"
            ) as d1,
        ):
            directory.register(0, d0.endpoint, k0.public_hex())
            directory.register(1, d1.endpoint, k1.public_hex())  # d1 holds the wrong secret
            with pytest.raises(LinkError, match="prove"):
                await d0.bind_interdomain(1, 1)
            with pytest.raises(LinkError):
                await d1.bind_interdomain(0, 1)  # d0 refuses d1's proof
            directory.register(2, d1.endpoint, k1.public_hex())  # domain 2's endpoint is d1's
            with pytest.raises(LinkError):
                await d0.bind_interdomain(2, 1)
            assert d0.link_to(1) is None and d1.link_to(0) is None


async def test_garbage_dialer_does_not_hurt_the_listener(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            for junk in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc", b"GET / HTTP/1.0\r\n\r\n"):
                stream = await trio.open_unix_socket(str(tmp_path / "dom1.sock"))
                await stream.send_all(junk)
                # the listener drops the connection (EOF or reset), nothing else
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await stream.receive_some(100) == b""
                await stream.aclose()
            unbound = await front.alloc_unbound(0)
            await back.bind_interdomain(1, unbound.port)  # still serving


async def test_transport_choice(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "auto", "unix") as (back, _front):
            await back.connect(1)
            assert back.link_to(1).transport == "shm"  # type: ignore[union-attr]
        async with domains(tmp_path, "auto", "tcp") as (back, _front):
            await back.connect(1)
            assert back.link_to(1).transport == "socket"  # type: ignore[union-attr]
        async with domains(tmp_path, "shm", "tcp") as (back, _front):
            with pytest.raises(LinkError, match="shm"):
                await back.connect(1)


async def test_simultaneous_dials_make_one_link(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (a, b):
            links: list[Any] = []

            async def dial(dom: Any, peer: int) -> None:
                links.append(await dom.connect(peer))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(dial, a, 1)
                nursery.start_soon(dial, b, 0)
            assert a.link_to(1) is not None and b.link_to(0) is not None
            unbound = await b.alloc_unbound(0)
            bound = await a.bind_interdomain(1, unbound.port)
            bound.notify()
            await unbound.wait()


class Double:
    """A fault double: per message type, drop / duplicate / delay / fail."""

    def __init__(self) -> None:
        self.rules: dict[int, str] = {}
        self.seen: list[int] = []

    def on_send(self, src: int, dst: int, message: Message) -> Verdict | None:
        self.seen.append(message.kind)
        rule = self.rules.get(message.kind)
        if rule == "drop":
            return Verdict(send=[])
        if rule == "duplicate":
            return Verdict(send=[message, message])
        if rule == "delay":
            return Verdict(send=[message], delay=0.2)
        if rule == "fail":
            return Verdict(fail="test")
        return None


async def test_fault_seam_drop_duplicate_delay_fail(tmp_path: Path) -> None:
    double = Double()
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix", faults=double) as (back, front):
            page = front.alloc_pages(1)[0]
            page.view[:3] = b"abc"
            gref = front.grants.grant_access(0, page.frame)
            unbound = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, unbound.port)
            buf = bytearray(3)
            copy = [CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 3, memoryview(buf))]

            # drop: the event never arrives (a copy round trip later proves it was not late)
            double.rules[Msg.EVENT] = "drop"
            bound.notify()
            assert await back.grant_copy(copy) == [GNTST.GNTST_okay]
            assert not unbound.pending

            # duplicate: the granter answers the copy twice; the second reply is ignored
            double.rules = {Msg.COPY: "duplicate"}
            link = front.link_to(0)
            assert link is not None
            before = link.messages_received
            assert await back.grant_copy(copy) == [GNTST.GNTST_okay]
            assert bytes(buf) == b"abc"
            assert link.messages_received - before == 2

            # delay: the event arrives, later
            double.rules = {Msg.EVENT: "delay"}
            start = trio.current_time()
            bound.notify()
            await unbound.wait()
            assert trio.current_time() - start >= 0.2

            # fail: the link breaks like a dead peer
            double.rules = {Msg.COPY: "fail"}
            with pytest.raises(PeerGone):
                await back.grant_copy(copy)
            assert Msg.EVENT in double.seen and Msg.BIND in double.seen


async def dial_past_handshake(tmp_path: Path, dialer: Domain, peer: Domain) -> trio.SocketStream:
    """A socket-transport link from `dialer` to `peer`, authenticated, as a raw stream: the
    test speaks (or stops speaking) the link protocol itself."""
    stream = await trio.open_unix_socket(str(tmp_path / f"dom{peer.domid}.sock"))
    layout = handshake.Layout(dialer.memory.nr_frames, 16, dialer.memory.size)
    terms = handshake.Terms(dialer.key, "socket", dialer.memory.fd, layout)
    await handshake.dial(stream, terms, peer=peer.domid, peer_pubkey=peer.key.public_hex())
    return stream


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # a byte msgpack never uses
        msgpack.packb("not a list"),
        msgpack.packb([99, 1]),  # unknown message type
        msgpack.packb([Msg.UPDATE, [[1, 8, 0, b"x"]]]),  # writes a grant it never mapped
        msgpack.packb([Msg.MAP, 1, "grefs", False]),
        msgpack.packb([Msg.COPY, 1, [[True, 8, 0]]]),
    ],
)
async def test_authenticated_peer_sending_garbage_loses_its_link(
    tmp_path: Path, garbage: bytes
) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix", (0, 1, 2)) as (back, front, hostile):
            front.grants.grant_access(2, front.alloc_pages(1)[0].frame)
            stream = await dial_past_handshake(tmp_path, hostile, front)
            await stream.send_all(garbage)
            with contextlib.suppress(trio.BrokenResourceError):
                while await stream.receive_some(65536):
                    pass  # until the domain drops the link
            await stream.aclose()
            unbound = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, unbound.port)  # still serving others
            bound.notify()
            await unbound.wait()


async def test_peer_that_stops_reading_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "MAX_BACKLOG", 1 << 20)
    with trio.fail_after(30):
        async with domains(tmp_path, "socket", "unix", (1, 2)) as (front, hostile):
            pages = front.alloc_buffer(16)
            grefs = [front.grants.grant_access(2, f) for f in pages.frames()]
            stream = await dial_past_handshake(tmp_path, hostile, front)
            died: list[str] = []
            gone = trio.Event()
            original = front.link_died

            def spy(link: Any) -> None:
                died.append(link.dead)
                gone.set()
                original(link)

            monkeypatch.setattr(front, "link_died", spy)
            ops = [[False, gref, 0, 4096, None] for gref in grefs]  # 64 KiB of reply each
            requests = b"".join(msgpack.packb([Msg.COPY, i + 1, ops]) for i in range(64))
            await stream.send_all(requests)  # 4 MiB of replies that are never read
            await gone.wait()
            assert "not reading" in died[0]
            await stream.aclose()


async def test_peer_that_never_answers_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link_module, "CALL_TIMEOUT", 0.5)
    double = Double()
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix", faults=double) as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            await back.connect(1)
            double.rules[Msg.REPLY] = "drop"  # the granter goes silent
            with pytest.raises(PeerGone, match="did not answer"):
                await back.map_grants(1, [gref])
            assert back.link_to(1) is None


async def test_after_a_link_drops_new_operations_redial(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "auto", "unix") as (back, front):
            first = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, first.port)
            back.disconnect(1, "test")
            with pytest.raises(EventChannelClosed):
                await first.wait()  # the front saw the link go
            with pytest.raises(EventChannelClosed):
                bound.notify()
            second = await front.alloc_unbound(0)
            again = await back.bind_interdomain(1, second.port)  # a fresh link
            again.notify()
            await second.wait()
