"""A small NBD client for the tests (the other side of `xenpv.nbd.protocol`): just enough to
drive the handshake and send raw requests, including malformed ones."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from xenpv.nbd import protocol as p


@dataclass
class Negotiated:
    size: int = 0
    flags: int = 0
    block_sizes: tuple[int, int, int] | None = None
    structured: bool = False
    infos: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    cookie: int
    error: int
    data: bytes = b""
    message: str = ""


class NbdClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.negotiated = Negotiated()

    async def receive_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buffer)} of {n} bytes")
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    async def at_eof(self) -> bool:
        """True once the server closed the connection (nothing more to read)."""
        if self.buffer:
            return False
        try:
            return not await self.stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            return True

    async def greeting(
        self, client_flags: int = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES
    ) -> int:
        magic, opt, flags = struct.unpack(">QQH", await self.receive_exactly(18))
        assert (magic, opt) == (p.NBDMAGIC, p.IHAVEOPT)
        await self.stream.send_all(struct.pack(">I", client_flags))
        return int(flags)

    async def option(self, option: int, data: bytes = b"") -> None:
        await self.stream.send_all(p.pack_option(option, data))

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, length = struct.unpack(">QIII", await self.receive_exactly(20))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, kind, await self.receive_exactly(length)

    async def handshake(
        self, *, structured: bool = True, name: str = "", block_size: bool = True
    ) -> Negotiated:
        await self.greeting()
        if structured:
            await self.option(p.Opt.STRUCTURED_REPLY)
            _, kind, _ = await self.option_reply()
            assert kind == p.REP_ACK
            self.negotiated.structured = True
        requests = [p.INFO_BLOCK_SIZE] if block_size else []
        await self.option(p.Opt.GO, p.pack_info_request(name, requests))
        while True:
            _, kind, data = await self.option_reply()
            if kind == p.REP_ACK:
                return self.negotiated
            if kind != p.REP_INFO:
                raise ConnectionError(f"GO refused: {kind:#x} {data!r}")
            (info,) = struct.unpack_from(">H", data)
            self.negotiated.infos.append(info)
            if info == p.INFO_EXPORT:
                _, self.negotiated.size, self.negotiated.flags = struct.unpack(">HQH", data)
            elif info == p.INFO_BLOCK_SIZE:
                self.negotiated.block_sizes = struct.unpack(">III", data[2:])

    async def send(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 1,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        await self.stream.send_all(
            p.pack_request(
                cmd, cookie=cookie, offset=offset, length=length, flags=flags, payload=payload
            )
        )

    async def reply(self, read_length: dict[int, int] | None = None) -> Reply:
        """The next reply; a simple reply to a read needs its length (`read_length[cookie]`)."""
        (magic,) = struct.unpack(">I", await self.receive_exactly(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.receive_exactly(12))
            n = (read_length or {}).get(cookie, 0) if not error else 0
            return Reply(cookie, error, await self.receive_exactly(n))
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, error, message = bytearray(), 0, ""
        while True:
            flags, kind, cookie, length = struct.unpack(">HHQI", await self.receive_exactly(16))
            body = await self.receive_exactly(length)
            if kind == p.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif kind == p.REPLY_TYPE_ERROR:
                error, n = struct.unpack_from(">IH", body)
                message = body[6 : 6 + n].decode()
            if flags & p.REPLY_FLAG_DONE:
                return Reply(cookie, error, bytes(data), message)
            (magic,) = struct.unpack(">I", await self.receive_exactly(4))

    async def call(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 7,
        flags: int = 0,
        payload: bytes = b"",
    ) -> Reply:
        """Send one request and return its reply."""
        await self.send(cmd, offset, length, cookie=cookie, flags=flags, payload=payload)
        reply = await self.reply({cookie: length} if cmd == p.Cmd.READ else None)
        assert reply.cookie == cookie
        return reply


@asynccontextmanager
async def nbd_client(
    path: str, *, negotiate: bool = True, structured: bool = True
) -> AsyncIterator[NbdClient]:
    """A client on the unix socket `path`, through the handshake, or with `negotiate=False`
    only past the server's greeting; closed on exit."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        client = NbdClient(stream)
        if negotiate:
            await client.handshake(structured=structured)
        else:
            await client.greeting()
        yield client
