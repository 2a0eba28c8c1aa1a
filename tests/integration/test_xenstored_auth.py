"""TCP listener: a domain proves its domid with its key before anything else."""

from __future__ import annotations

import struct
from functools import partial

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv import identity
from xenpv.identity import DomainKey
from xenpv.xenstore import auth
from xenpv.xenstore.client import XenstoreClient, connect
from xenpv.xenstore.wire import Message, XsError, XsType, join_strings

TIMEOUT = 20


async def _publish(dom0: XenstoreClient, key: DomainKey) -> None:
    await dom0.write(identity.pubkey_path(key.domid), key.public_hex())
    home = f"/local/domain/{key.domid}"
    await dom0.mkdir(home)
    await dom0.set_perms(home, [f"n{key.domid}"])


async def _tcp_stream(server: Xenstored) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", server.tcp_port)


async def _receive_until_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_good_key_proves_domid(xenstored: Xenstored) -> None:
    key = DomainKey.generate(5)
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as dom0:
            await _publish(dom0, key)
            async with connect(xenstored.tcp, key=key) as guest:
                assert guest.domid == 5
                await guest.write("name", "guest5")  # relative: /local/domain/5/name
                assert await dom0.read_text("/local/domain/5/name") == "guest5"
                assert await guest.get_perms("name") == ["n5"]
                with pytest.raises(XsError) as info:
                    await guest.write("/tool/evil", "x")
                assert info.value.errno_name == "EACCES"
                with pytest.raises(XsError) as info:
                    await guest.introduce(9)
                assert info.value.errno_name == "EACCES"


async def test_wrong_key_is_refused(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as dom0:
            await _publish(dom0, DomainKey.generate(5))
            impostor = DomainKey.generate(5)
            with pytest.raises(auth.AuthError, match="refused"):
                async with connect(xenstored.tcp, key=impostor):
                    pass
            # Unpublished domain and dom0 over TCP are refused the same way.
            for key in (DomainKey.generate(6), DomainKey.generate(0)):
                with pytest.raises(auth.AuthError, match="refused"):
                    async with connect(xenstored.tcp, key=key):
                        pass
            assert await dom0.try_read("/local/domain/5/name") is None


async def test_key_of_another_domain_cannot_claim_its_domid(xenstored: Xenstored) -> None:
    five, six = DomainKey.generate(5), DomainKey.generate(6)
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as dom0:
            await _publish(dom0, five)
            await _publish(dom0, six)
            stream = await _tcp_stream(xenstored)
            buf = bytearray()
            challenge = auth.parse_hello(await auth.receive_exactly(stream, auth.HELLO_SIZE, buf))
            # Domain 6 signs, but claims to be 5.
            forged = struct.pack("<I", 5) + six.sign(auth.PURPOSE, challenge)
            await stream.send_all(forged)
            assert await _receive_until_eof(stream) == auth.REFUSED


async def test_xs_wire_without_handshake_does_nothing(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        stream = await _tcp_stream(xenstored)
        # Exactly one PROOF's worth of bytes, so the refusal is read before the close.
        write = Message(XsType.XS_WRITE, 1, 0, join_strings("/pwned") + b"x" * 45)
        assert len(write.encode()) == auth.PROOF_SIZE
        await stream.send_all(write.encode())
        data = await _receive_until_eof(stream)
        assert data.startswith(auth.MAGIC)
        assert data[auth.HELLO_SIZE :] == auth.REFUSED
        async with connect(xenstored.unix) as dom0:
            assert await dom0.try_read("/pwned") is None


async def test_garbage_and_silence_do_not_stall_others(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        silent = await _tcp_stream(xenstored)  # never answers the HELLO
        garbage = await _tcp_stream(xenstored)
        await garbage.send_all(bytes(range(auth.PROOF_SIZE)))
        data = await _receive_until_eof(garbage)
        assert data[auth.HELLO_SIZE :] == auth.REFUSED
        async with connect(xenstored.unix) as dom0:
            await dom0.write("/still", "serving")
            assert await dom0.read_text("/still") == "serving"
        await silent.aclose()


async def test_client_rejects_a_server_that_is_not_xenstored() -> None:
    async def fake_server(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 100)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, fake_server, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(auth.AuthError, match="magic"):
                async with connect(f"tcp:127.0.0.1:{port}", key=DomainKey.generate(3)):
                    pass
            nursery.cancel_scope.cancel()


async def test_release_drops_the_domains_connections(xenstored: Xenstored) -> None:
    key = DomainKey.generate(5)
    with trio.fail_after(TIMEOUT):
        async with connect(xenstored.unix) as dom0:
            await _publish(dom0, key)
            await dom0.introduce(5, 1, 1)
            stream = await _tcp_stream(xenstored)
            await auth.client_handshake(stream, key)
            # The guest is served...
            await stream.send_all(Message(XsType.XS_READ, 1, 0, b"/local/domain/5\0").encode())
            first = await stream.receive_some(65536)
            assert first[:4] == struct.pack("<I", XsType.XS_READ)
            # ...until the toolstack releases the domain: then its connection is closed.
            await dom0.release(5)
            assert await _receive_until_eof(stream) == b""
