"""The async xenstore client every xenpv component uses.

    async with connect("unix:/run/xenstored/socket") as xs:          # dom0
        await xs.write("/local/domain/1/name", "guest")
    async with connect("tcp:127.0.0.1:8010", key=DomainKey.load(p)) as xs:   # domain N
        async with xs.watch("device") as events:
            async for path, token in events: ...

One connection per client. Requests are multiplexed by req_id: any number of tasks may issue
requests concurrently; one reader task routes replies to their callers and watch events (by
token) to the watch iterators; one writer task sends everything queued with one `send_all`.

Reconnection (the server restarted, or the link broke): the client reconnects with
exponential backoff (50 ms doubling to 2 s) for up to `reconnect_timeout` seconds, then:
- re-registers every watch it holds (the server sends the usual initial event, which the
  watch iterator delivers like any other event: treat it as "re-read your state");
- re-sends every request outside a transaction that had no reply yet. This is safe because
  they are idempotent for our purposes: WRITE/MKDIR/SET_PERMS/INTRODUCE of the same value
  twice is harmless, RM of an already-removed node whose parent exists is OK, WATCH was lost
  with the old server. Two exceptions are visible: a re-sent RELEASE may answer ENOENT, and a
  TRANSACTION_START re-sent opens a transaction on the new connection (no harm);
- fails every request inside a transaction (including TRANSACTION_END) with EAGAIN, and any
  later use of a transaction opened on the old connection also gets EAGAIN, so `transact`
  starts over. Caveat: if the server had committed the transaction durably but its reply was
  lost, `transact` runs the function again (xenstore transactions are meant to be
  re-runnable, like their C users' retry loops).
If reconnection fails within the timeout, pending and later requests raise
`XenstoreConnectionError` and watch iterators raise it too.

Watch tokens must be unique within one client (events are routed by token); by default the
client generates one.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
import trio

from xenpv.address import split_address
from xenpv.errors import XenpvError
from xenpv.identity import DomainKey
from xenpv.xenstore import auth
from xenpv.xenstore.wire import (
    XSD_ERRORS,
    FrameReader,
    Message,
    XsError,
    XsProtocolError,
    XsType,
    error_name,
    join_strings,
    split_strings,
)

T = TypeVar("T")

log = structlog.get_logger()

_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_MAX_TRANSACTION_ATTEMPTS = 1000


class XenstoreConnectionError(XenpvError):
    """xenstored cannot be reached (or could not be reached again within the timeout)."""


class XenstoreValueError(XenpvError):
    """A value asked for as text is not valid UTF-8."""


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed client address: `unix:/path` or `tcp:HOST:PORT`."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def default_address() -> str:
    """Where libxenstore would connect: `unix:$XENSTORED_PATH`, else C xenstored's socket."""
    return "unix:" + (os.environ.get("XENSTORED_PATH") or "/var/run/xenstored/socket")


def parse_address(address: str) -> Address:
    """Parse `unix:/path` or `tcp:HOST:PORT` (HOST may be `[v6]`)."""
    parsed = split_address(address)
    if parsed is not None:
        kind, where, port = parsed
        if kind == "unix":
            return Address("unix", path=where)
        if 0 < port < 65536:
            return Address("tcp", host=where, port=port)
    raise XenpvError(f"bad xenstore address {address!r}: expected unix:/path or tcp:HOST:PORT")


def _path(path: str) -> bytes:
    try:
        raw = path.encode("ascii")
    except UnicodeEncodeError:
        raise XsError("EINVAL", f"non-ASCII path {path!r}") from None
    if b"\0" in raw:
        raise XsError("EINVAL", "NUL in path")
    return raw + b"\0"


def _raise_for(reply: Message) -> Message:
    if reply.type == XsType.XS_ERROR:
        name = error_name(reply)
        raise XsError(name) if name in XSD_ERRORS else XsError("EIO", f"unknown error {name!r}")
    return reply


@dataclass(slots=True, eq=False)
class _Pending:
    msg: Message
    epoch: int = 0  # connection the request was last sent on
    internal: bool = False  # watch re-registration: nobody waits for it
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None
    error: BaseException | None = None

    def finish(self, reply: Message | None = None, error: BaseException | None = None) -> None:
        self.reply = reply
        self.error = error
        self.done.set()


class _Watch:
    """Events for one registered watch, consumed as an async iterator."""

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.token = token
        self.registered = False
        self.failed: BaseException | None = None
        self._events: deque[tuple[str, str]] = deque()
        self._wake = trio.Event()

    def push(self, event: tuple[str, str]) -> None:
        self._events.append(event)
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        self.failed = error
        self._wake.set()

    def __aiter__(self) -> _Watch:
        return self

    async def __anext__(self) -> tuple[str, str]:
        while not self._events:
            if self.failed is not None:
                raise XenstoreConnectionError(str(self.failed))
            self._wake = trio.Event()
            await self._wake.wait()
        return self._events.popleft()


class _Ops:
    """Operations shared by the client and a transaction; `_call` sends one request."""

    async def _call(self, type_: XsType, payload: bytes) -> Message:
        raise NotImplementedError

    async def read(self, path: str) -> bytes:
        return (await self._call(XsType.XS_READ, _path(path))).payload

    async def read_text(self, path: str) -> str:
        value = await self.read(path)
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise XenstoreValueError(f"xenstore value at {path} is not UTF-8 text") from None

    async def try_read(self, path: str) -> bytes | None:
        try:
            return await self.read(path)
        except XsError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise

    async def try_directory(self, path: str, *, ignore: tuple[str, ...] = ("ENOENT",)) -> list[str]:
        """DIRECTORY, or [] when it fails with one of `ignore` (by default: no such node)."""
        try:
            return await self.directory(path)
        except XsError as exc:
            if exc.errno_name in ignore:
                return []
            raise

    async def write(self, path: str, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        await self._call(XsType.XS_WRITE, _path(path) + data)

    async def mkdir(self, path: str) -> None:
        await self._call(XsType.XS_MKDIR, _path(path))

    async def rm(self, path: str) -> None:
        await self._call(XsType.XS_RM, _path(path))

    async def directory(self, path: str) -> list[str]:
        """Children in insertion order; uses DIRECTORY_PART when the list exceeds 4096 bytes."""
        try:
            reply = await self._call(XsType.XS_DIRECTORY, _path(path))
        except XsError as exc:
            if exc.errno_name != "E2BIG":
                raise
            return await self._directory_part(path)
        return split_strings(reply.payload)

    async def _directory_part(self, path: str) -> list[str]:
        # As libxenstore's xs_directory_part: fetch from byte offsets until the terminating
        # empty string; start over if the node's generation changes between parts.
        while True:
            generation: bytes | None = None
            chunks: list[bytes] = []
            offset = 0
            while True:
                reply = await self._call(
                    XsType.XS_DIRECTORY_PART, _path(path) + str(offset).encode() + b"\0"
                )
                gen, _, rest = reply.payload.partition(b"\0")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break  # the directory changed under us: restart
                final = rest == b"\0" or rest.endswith(b"\0\0") or not rest
                if final:
                    rest = rest[:-1] if rest else rest
                chunks.append(rest)
                offset += len(rest)
                if final:
                    return split_strings(b"".join(chunks))

    async def get_perms(self, path: str) -> list[str]:
        return split_strings((await self._call(XsType.XS_GET_PERMS, _path(path))).payload)

    async def set_perms(self, path: str, perms: Sequence[str]) -> None:
        try:
            payload = _path(path) + join_strings(*perms)
        except UnicodeEncodeError:
            raise XsError("EINVAL", "non-ASCII permission") from None
        await self._call(XsType.XS_SET_PERMS, payload)


class Transaction(_Ops):
    """An open transaction; its operations carry its tx_id. Made by `XenstoreClient.transact`."""

    def __init__(self, client: XenstoreClient, tx_id: int, epoch: int) -> None:
        self.client = client
        self.tx_id = tx_id
        self.epoch = epoch

    async def _call(self, type_: XsType, payload: bytes) -> Message:
        return await self.client._request(type_, payload, self)


# try_directory(ignore=UNREADABLE): a node that is missing or not ours to read lists as empty.
UNREADABLE = ("ENOENT", "EACCES")


class XenstoreClient(_Ops):
    """A connection to xenstored. Create with `connect()`."""

    def __init__(self, address: Address, key: DomainKey | None, reconnect_timeout: float) -> None:
        self.address = address
        self.domid = key.domid if (key is not None and address.kind == "tcp") else 0
        self._key = key
        self._reconnect_timeout = reconnect_timeout
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._watches: dict[str, _Watch] = {}
        self._outbox: list[bytes] = []
        self._outbox_wake = trio.Event()
        self._connected = False
        self._epoch = 0
        self._dead: BaseException | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        """False while the connection is lost (reconnecting), given up or closed."""
        return self._connected and self._dead is None and not self._closed

    # -- connection management -------------------------------------------------------------

    async def _open_stream(self) -> trio.abc.Stream:
        addr = self.address
        stream: trio.abc.Stream
        try:
            if addr.kind == "unix":
                stream = await trio.open_unix_socket(addr.path)
            else:
                if self._key is None:
                    raise XenpvError(f"{addr}: a TCP connection needs the domain's key")
                stream = await trio.open_tcp_stream(addr.host, addr.port)
                try:
                    with trio.fail_after(10):
                        await auth.client_handshake(stream, self._key)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except OSError as exc:
            raise XenstoreConnectionError(
                f"cannot connect to xenstored at {addr}: {exc.strerror or exc}"
            ) from None
        except (trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise XenstoreConnectionError(
                f"handshake with xenstored at {addr} failed: {exc}"
            ) from None
        return stream

    async def _run(self, stream: trio.abc.Stream) -> None:
        """Serve connections until closed; reconnect after a drop."""
        while True:
            self._epoch += 1
            self._connected = True
            self._outbox.clear()
            self._resend_all()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, stream, nursery.cancel_scope)
                    await self._reader(stream)
                    nursery.cancel_scope.cancel()
            finally:
                self._connected = False
                await trio.aclose_forcefully(stream)
            self._connection_lost()
            log.info("xenstore connection lost, reconnecting", address=str(self.address))
            try:
                stream = await self._reconnect()
            except (XenstoreConnectionError, auth.AuthError, XenpvError) as exc:
                self._die(XenstoreConnectionError(f"lost xenstored at {self.address}: {exc}"))
                return

    async def _reconnect(self) -> trio.abc.Stream:
        delay = _BACKOFF_FIRST
        last: BaseException | None = None
        with trio.move_on_after(self._reconnect_timeout):
            while True:
                try:
                    return await self._open_stream()
                except (XenstoreConnectionError, auth.AuthError) as exc:
                    last = exc
                await trio.sleep(delay)  # backoff between attempts, not synchronisation
                delay = min(delay * 2, _BACKOFF_MAX)
        raise XenstoreConnectionError(f"gave up after {self._reconnect_timeout:g}s ({last})")

    def _send_internal(self, type_: XsType, payload: bytes) -> None:
        """Send a request nobody waits for (its reply is dropped, an error logged)."""
        msg = Message(type_, self._next_req_id(), 0, payload)
        self._pending[msg.req_id] = _Pending(msg, self._epoch, internal=True)
        self._outbox.append(msg.encode())
        self._outbox_wake.set()

    def _resend_all(self) -> None:
        for w in self._watches.values():
            if w.registered:
                req_id = self._next_req_id()
                msg = Message(XsType.XS_WATCH, req_id, 0, join_strings(w.path, w.token))
                p = _Pending(msg, self._epoch, internal=True)
                self._pending[req_id] = p
                self._outbox.append(msg.encode())
        for p in sorted(self._pending.values(), key=lambda p: p.msg.req_id):
            if not p.internal:
                p.epoch = self._epoch
                self._outbox.append(p.msg.encode())
        self._outbox_wake.set()

    def _connection_lost(self) -> None:
        for req_id, p in list(self._pending.items()):
            if p.internal:
                del self._pending[req_id]
            elif p.msg.tx_id != 0 or p.msg.type == XsType.XS_TRANSACTION_END:
                del self._pending[req_id]
                p.finish(error=XsError("EAGAIN", "connection to xenstored lost"))

    def _die(self, error: BaseException) -> None:
        self._dead = error
        for p in self._pending.values():
            p.finish(error=XenstoreConnectionError(str(error)))
        self._pending.clear()
        for w in self._watches.values():
            w.fail(error)

    async def _writer(self, stream: trio.abc.Stream, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self._outbox:
                    self._outbox_wake = trio.Event()
                    await self._outbox_wake.wait()
                    continue
                data = b"".join(self._outbox)
                self._outbox.clear()
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()

    async def _reader(self, stream: trio.abc.Stream) -> None:
        frames = FrameReader()
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                return
            try:
                messages = frames.feed(bytes(data))
            except XsProtocolError as exc:
                log.warning("bad frame from xenstored, reconnecting", error=str(exc))
                return
            for msg in messages:
                self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        if msg.type == XsType.XS_WATCH_EVENT:
            try:
                parts = split_strings(msg.payload)
            except UnicodeDecodeError:
                parts = []
            if len(parts) >= 2:
                watch = self._watches.get(parts[1])
                if watch is not None:
                    watch.push((parts[0], parts[1]))
            return
        p = self._pending.pop(msg.req_id, None)
        if p is None:
            log.debug("reply without request", req_id=msg.req_id, type=msg.type)
            return
        if p.internal:
            if msg.type == XsType.XS_ERROR and error_name(msg) != "EEXIST":
                log.warning("an internal request failed", type=p.msg.type, error=error_name(msg))
            return
        p.finish(reply=msg)

    def _next_req_id(self) -> int:
        req_id = next(self._req_ids)
        if req_id >= 1 << 32:
            self._req_ids = itertools.count(1)
            req_id = next(self._req_ids)
        return req_id

    # -- requests --------------------------------------------------------------------------

    async def _request(
        self, type_: XsType, payload: bytes, tx: Transaction | None = None
    ) -> Message:
        return (await self._request_on(type_, payload, tx))[0]

    async def _request_on(
        self, type_: XsType, payload: bytes, tx: Transaction | None = None
    ) -> tuple[Message, int]:
        """Send one request; the reply and the connection epoch it came back on."""
        if self._dead is not None:
            raise XenstoreConnectionError(str(self._dead))
        if self._closed:
            raise XenstoreConnectionError("the xenstore client is closed")
        tx_id = 0
        if tx is not None:
            if tx.epoch != self._epoch or not self._connected:
                raise XsError("EAGAIN", "transaction lost with the connection to xenstored")
            tx_id = tx.tx_id
        p = _Pending(Message(type_, self._next_req_id(), tx_id, payload), self._epoch)
        self._pending[p.msg.req_id] = p
        if self._connected:
            self._outbox.append(p.msg.encode())
            self._outbox_wake.set()
        try:
            await p.done.wait()
        except BaseException:
            self._pending.pop(p.msg.req_id, None)
            raise
        if p.error is not None:
            raise p.error
        assert p.reply is not None
        return _raise_for(p.reply), p.epoch

    async def _call(self, type_: XsType, payload: bytes) -> Message:
        return await self._request(type_, payload)

    def watch(
        self, path: str, token: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[tuple[str, str]]]:
        """Register a watch; the context yields an iterator of (path, token) events.

        The first event is the immediate one xenstored sends on registration. Leaving the
        context unregisters the watch.
        """
        return self._watch(path, token)

    @asynccontextmanager
    async def _watch(
        self, path: str, token: str | None
    ) -> AsyncIterator[AsyncIterator[tuple[str, str]]]:
        if token is None:
            token = f"xenpv-{next(self._tokens)}"
            while token in self._watches:
                token = f"xenpv-{next(self._tokens)}"
        elif token in self._watches:
            raise XsError("EEXIST", f"watch token {token!r} already used by this client")
        payload = _path(path) + _path(token)
        watch = _Watch(path, token)
        self._watches[token] = watch
        try:
            await self._request(XsType.XS_WATCH, payload)
            watch.registered = True
            yield watch
        finally:
            del self._watches[token]
            if watch.registered and self._connected and not self._closed and self._dead is None:
                if trio.current_effective_deadline() == -math.inf:
                    # Cancelled: the task reading replies is likely cancelled with us, so
                    # waiting for the reply would only run out the timeout. Send, wait for none.
                    self._send_internal(XsType.XS_UNWATCH, payload)
                else:
                    with (
                        trio.CancelScope(shield=True),
                        trio.move_on_after(5),
                        suppress(XsError, XenstoreConnectionError),
                    ):
                        await self._request(XsType.XS_UNWATCH, payload)

    async def transact(self, fn: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run `fn` in a transaction and commit; start over from scratch on EAGAIN.

        An exception from `fn` (other than EAGAIN) aborts the transaction and propagates.
        """
        for attempt in range(_MAX_TRANSACTION_ATTEMPTS):
            if attempt:
                await trio.sleep(random.uniform(0, min(0.1, 0.001 * 2**attempt)))  # backoff
            reply, epoch = await self._request_on(XsType.XS_TRANSACTION_START, b"\0")
            tx_id = int(reply.payload.rstrip(b"\0") or b"0")
            tx = Transaction(self, tx_id, epoch)
            try:
                result = await fn(tx)
            except XsError as exc:
                await self._abort(tx)
                if exc.errno_name == "EAGAIN":
                    continue
                raise
            except BaseException:
                await self._abort(tx)
                raise
            try:
                await self._request(XsType.XS_TRANSACTION_END, b"T\0", tx)
            except XsError as exc:
                if exc.errno_name == "EAGAIN":
                    continue
                raise
            return result
        raise XsError(
            "EAGAIN", f"transaction still conflicting after {_MAX_TRANSACTION_ATTEMPTS} attempts"
        )

    async def _abort(self, tx: Transaction) -> None:
        if tx.epoch != self._epoch or not self._connected or self._dead is not None:
            return
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(5),
            suppress(XsError, XenstoreConnectionError),
        ):
            await self._request(XsType.XS_TRANSACTION_END, b"F\0", tx)

    async def introduce(self, domid: int, gfn: int = 0, port: int = 0) -> None:
        await self._call(XsType.XS_INTRODUCE, join_strings(str(domid), str(gfn), str(port)))

    async def release(self, domid: int) -> None:
        await self._call(XsType.XS_RELEASE, join_strings(str(domid)))

    async def is_domain_introduced(self, domid: int) -> bool:
        reply = await self._call(XsType.XS_IS_DOMAIN_INTRODUCED, join_strings(str(domid)))
        return reply.payload.startswith(b"T")

    async def get_domain_path(self, domid: int) -> str:
        reply = await self._call(XsType.XS_GET_DOMAIN_PATH, join_strings(str(domid)))
        return reply.payload.rstrip(b"\0").decode("ascii", "replace")


@asynccontextmanager
async def connect(
    address: str, *, key: DomainKey | None = None, reconnect_timeout: float = 30.0
) -> AsyncIterator[XenstoreClient]:
    """Connect to xenstored at `unix:/path` (dom0) or `tcp:HOST:PORT` (proving `key.domid`).

    Raises XenstoreConnectionError if the server cannot be reached, AuthError if it refuses
    the key. See the module docstring for what happens when the connection drops later.
    """
    async with running(XenstoreClient(parse_address(address), key, reconnect_timeout)) as client:
        yield client


@asynccontextmanager
async def running(client: XenstoreClient) -> AsyncIterator[XenstoreClient]:
    """Open `client`'s connection and serve it for the block (`connect`, and clients whose
    stream comes from elsewhere: xenpv/sim/)."""
    stream = await client._open_stream()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run, stream)
            try:
                yield client
            finally:
                client._closed = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery only runs the connection task, which handles its own errors: give
        # the caller back the exception its own code raised, not a group around it.
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    while len(group.exceptions) == 1:
        only = group.exceptions[0]
        if not isinstance(only, BaseExceptionGroup):
            return only
        group = only
    return None
