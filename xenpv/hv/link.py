"""One authenticated domain link: an ordered message stream with one batching writer.

A `Link` carries every message between two domain runtimes. `send` is synchronous and never
blocks: it appends to the output queue and wakes the writer task, which drains the whole
queue with one `send_all` (per-call overhead dominates small messages). Replica
writes (`add_dirty`) are queued as ranges and turned into one UPDATE message whenever another
message is queued and at the end of every drain, so they travel in program order, before any
later notification, and eagerly (the Dekker rule in docs/hypervisor.md). The reader task
decodes the stream and hands each message to the domain synchronously, in order. Messages
are typed records (messages.py), encoded and decoded here and nowhere else.

When the stream ends or fails, the link dies once: pending calls fail with `PeerGone`, and
the domain is told (ports close, mappings die, the peer's pins are dropped).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import msgpack
import structlog
import trio

from xenpv.hv.busypoll import AdaptivePoll
from xenpv.hv.errors import PeerGone
from xenpv.hv.faults import LinkFaults
from xenpv.hv.memory import SharedPeerMemory
from xenpv.hv.messages import (
    DECODERS,
    REPLY,
    Message,
    ProtocolViolation,
    R,
    Reply,
    Request,
    Update,
    Whose,
    decode,
)
from xenpv.metrics.counters import PeerStats

__all__ = ["Link", "LinkHost", "ProtocolViolation", "SharedPeerMemory"]

log = structlog.get_logger()

# Received into one reusable buffer: `recv(n)` allocates n bytes per call, and at 256 KiB
# that is an mmap/munmap pair (~13 µs) on every wake-up of the latency path.
RECEIVE_SIZE = 1 << 18
MAX_MESSAGE = 64 << 20
# Output queued behind a peer that stopped reading: beyond this the link is dropped (the
# peer is treated as dead) rather than growing without bound.
MAX_BACKLOG = 64 << 20
# A request (map, copy, bind, unmap) unanswered this long means the peer is gone.
CALL_TIMEOUT = 30.0


class LinkHost(Protocol):
    domid: int

    def handle_message(self, link: Link, message: Message) -> None: ...

    def link_died(self, link: Link) -> None: ...


T = TypeVar("T")


class _Call:
    __slots__ = ("abandoned", "done", "error", "on_abandoned", "on_reply", "reply_type", "result")

    def __init__(
        self,
        reply_type: type[Reply],
        on_reply: Callable[[Any], object] | None,
        on_abandoned: Callable[[Any], None] | None,
    ) -> None:
        self.done = trio.Event()
        self.reply_type = reply_type
        self.result: object = None
        self.error: Exception | None = None
        self.on_reply = on_reply
        self.on_abandoned = on_abandoned
        self.abandoned = False


class Link:
    """The link from this domain to domain `peer`."""

    def __init__(
        self,
        host: LinkHost,
        peer: int,
        stream: trio.SocketStream,
        *,
        shared: SharedPeerMemory | None,
        faults: LinkFaults | None,
        busy_poll: float,
    ) -> None:
        self.host = host
        self.peer = peer
        self.shared = shared
        self.dead: str | None = None
        self.stats = PeerStats()  # the host swaps in its per-peer record (docs/metrics.md)
        self._stream = stream
        self._fd = stream.socket.fileno()
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)
        self._received = memoryview(bytearray(RECEIVE_SIZE))
        self._receive_buffers = [self._received]
        self._borrowed = False  # a task is receiving in place of the reader (receive_until)
        self._borrower_wait: trio.CancelScope | None = None
        self._reader_wait: trio.CancelScope | None = None
        # A borrower woke the reader (cancelled its socket wait, or unparked it on leaving)
        # and it has not run since: runnable, but it only looks at the socket (or parks
        # again), so a borrower's spin need not yield to it (see `receive_until`).
        self._reader_waking = False
        self._reader_lot = trio.lowlevel.ParkingLot()
        self._poll = AdaptivePoll(busy_poll)
        self._faults = faults
        # Packed messages, a partly written one's rest (a view, not a copy), delay deadlines.
        self._out: list[bytes | memoryview | float] = []
        self._dirty: list[list[Any]] = []  # [whose, gref, offset, length, source, start]
        self._idle: trio.Event | None = None
        self._sending = False
        self._out_bytes = 0
        self._pending: dict[int, _Call] = {}
        self._next_id = 1
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._scope = trio.CancelScope()
        self.messages_received = 0
        self._died = False
        self.updates_received = 0

    @property
    def transport(self) -> str:
        return "shm" if self.shared is not None else "socket"

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: Message, *, wake: bool = True) -> None:
        """Queue `message` (after any pending replica writes); never blocks."""
        if self.dead is not None:
            raise PeerGone(f"link to domain {self.peer} is dead: {self.dead}")
        if self._dirty:
            self._queue_update()
        self._enqueue(message)
        if wake:
            self._wake_writer()

    def send_now(self, message: Message) -> None:
        """`send`, then write the queue to the socket at once unless the writer is mid-send.

        Used for notifications (a doorbell, like the EVTCHNOP_send hypercall) and requests:
        it saves the writer task's wake-up on the latency path.
        """
        self.send(message, wake=False)
        self._flush()

    def _flush(self) -> None:
        """Write the queued output now; bytes the socket does not take at once (or a queue
        the writer is busy with, or an injected delay) are left to the writer, so order is
        kept and nothing blocks."""
        if self._dirty:
            self._queue_update()
        out = self._out
        if not out:
            return
        if self._sending or (self._faults is not None and any(type(i) is float for i in out)):
            self._wake_writer()
            return
        # No floats past the check above.
        data: bytes | memoryview = out[0] if len(out) == 1 else b"".join(out)  # type: ignore[assignment,arg-type]
        try:
            sent = os.write(self._fd, data)
        except OSError:  # would block, or broken (the writer will report it)
            sent = 0
        if sent == len(data):
            self._out = []
        else:  # the rest as a view: slicing a large message's bytes would copy it
            self._out = [memoryview(data)[sent:] if sent else data]
        self._out_bytes -= sent
        if self._out:
            self._wake_writer()

    def set_faults(self, faults: LinkFaults | None) -> None:
        """Install or remove the fault seam at run time; removing it releases held delays
        (the output path without a seam takes bytes only)."""
        if faults is None and any(type(i) is float for i in self._out):
            self._out = [i for i in self._out if type(i) is not float]
        self._faults = faults

    def _wake_writer(self) -> None:
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.set()

    def _enqueue(self, message: Message) -> None:
        if self._faults is None:
            self._push(self._pack(message.encode()))
            return
        verdict = self._faults.on_send(self.host.domid, self.peer, message)
        if verdict is None:
            self._push(self._pack(message.encode()))
            return
        if verdict.fail is not None:
            self.close(f"injected fault: {verdict.fail}")
            return
        if verdict.delay > 0:
            # When it may leave (trio's clock), not a sleep: delayed messages are in flight
            # together, and a late wake-up of the writer does not add up over messages.
            self._out.append(trio.current_time() + verdict.delay)
        for m in verdict.send:
            self._push(self._pack(m.encode()))

    def _push(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > MAX_BACKLOG:
            self.close(f"domain {self.peer} is not reading ({self._out_bytes} bytes queued)")

    def add_dirty(
        self, whose: int, gref: int, offset: int, length: int, source: memoryview, start: int
    ) -> None:
        """Record a replica write; shipped at the end of this batch, before the next message."""
        if self.dead is not None:
            return
        dirty = self._dirty
        if dirty:
            last = dirty[-1]
            if (
                last[1] == gref
                and last[0] == whose
                and last[4] is source
                and last[2] + last[3] == offset
                and last[5] + last[3] == start
            ):
                last[3] += length
                return
        else:
            self._wake_writer()
        dirty.append([whose, gref, offset, length, source, start])

    def frame_written(
        self, gref: int, offset: int, length: int, source: memoryview, start: int
    ) -> None:
        """FrameWatcher: our memory under a grant the peer replicates changed."""
        self.add_dirty(Whose.SENDER, gref, offset, length, source, start)

    def _queue_update(self) -> None:
        entries = [
            (whose, gref, offset, bytes(source[start : start + length]))
            for whose, gref, offset, length, source, start in self._dirty
        ]
        self._dirty = []
        self._enqueue(Update(entries))  # the caller wakes the writer (or is the writer)

    async def call(self, request: Request, reply_type: type[R]) -> R:
        """Send a request (its `req` is set to a fresh id) and await its reply."""
        # No cast(): a function call on every hypercall's path, for the type checker only.
        return await self._call(request, reply_type, None, None)  # type: ignore[return-value]

    async def call_then(
        self,
        request: Request,
        reply_type: type[R],
        on_reply: Callable[[R], T],
        on_abandoned: Callable[[R | None], None],
    ) -> T:
        """`call`, with `on_reply(reply)` run in the receiving task, in link order, before any
        later message is handled (a mapping must exist before the granter's next UPDATE); its
        return value or exception becomes the call's. If the caller is cancelled first,
        `on_abandoned(reply)` runs instead when the reply comes, or `on_abandoned(None)` when
        the link dies first (e.g. to unmap what nobody will use).
        """
        return cast(T, await self._call(request, reply_type, on_reply, on_abandoned))

    async def _call(
        self,
        request: Request,
        reply_type: type[Reply],
        on_reply: Callable[[Any], object] | None,
        on_abandoned: Callable[[Any], None] | None,
    ) -> object:
        if self.dead is not None:
            raise PeerGone(f"link to domain {self.peer} is dead: {self.dead}")
        request_id = self._next_id
        self._next_id += 1
        request.req = request_id
        call = _Call(reply_type, on_reply, on_abandoned)
        self._pending[request_id] = call
        try:
            self.send_now(request)
            with trio.move_on_after(CALL_TIMEOUT):
                # Receive the reply in this task, as an event waiter does (receive_until);
                # if another task is receiving already, it sets `done`.
                finished = call.done.is_set
                while not finished():
                    if not await self.receive_until(finished):
                        await call.done.wait()
        except BaseException:
            if call.on_abandoned is not None and not call.done.is_set():
                call.abandoned = True  # keep it pending: the reply still needs undoing
            else:
                self._pending.pop(request_id, None)
            raise
        self._pending.pop(request_id, None)
        if not call.done.is_set():
            # A hypercall never hangs on the other domain; a peer that does not answer at all
            # (stopped, wedged, hostile) is treated as dead rather than hanging the caller.
            reason = f"domain {self.peer} did not answer within {CALL_TIMEOUT:g} s"
            self.close(reason)
            raise PeerGone(reason)
        if call.error is not None:
            raise call.error
        return call.result

    def reply(self, reply: Reply) -> None:
        if self.dead is None:
            self.send(reply)

    def violation(self, what: str) -> PeerGone:
        """The peer broke the link protocol: drop the link (as if it died) and say why."""
        self.close(f"protocol violation: {what}")
        return PeerGone(f"domain {self.peer} broke the link protocol: {what}")

    # -- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the reader and the writer until the link dies; then clean up (once)."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    await self._reader()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # e.g. a fault hook raising: this link dies, not the domain
            log.error("link failed", peer=self.peer, exc_info=True)
            self.dead = self.dead or f"internal error: {exc!r}"
        finally:
            self._die(self.dead or "link closed")
            with trio.CancelScope(shield=True):
                await self._stream.aclose()

    def close(self, reason: str) -> None:
        """Break the link (the peer sees EOF and treats this domain as gone)."""
        if self.dead is None:
            self.dead = reason
        self._scope.cancel()

    async def _writer(self) -> None:
        try:
            while True:
                if not self._out and not self._dirty:
                    idle = self._idle = trio.Event()
                    await idle.wait()
                # One non-blocking write first, as send_now does: send_all would add its own
                # checkpoints (task steps) to every eager UPDATE. What the socket does not take
                # (or an injected delay) goes the awaited way below, in order.
                self._flush()
                out, self._out = self._out, []
                if not out:
                    continue
                self._sending = True
                chunk: list[bytes | memoryview] = []
                for item in out:
                    if isinstance(item, float):
                        if chunk:
                            await self._send_chunk(b"".join(chunk))
                            chunk = []
                        await trio.sleep_until(item)
                    else:
                        chunk.append(item)
                if chunk:
                    await self._send_chunk(chunk[0] if len(chunk) == 1 else b"".join(chunk))
                self._sending = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close(f"send failed: {exc}")

    async def _send_chunk(self, data: bytes | memoryview) -> None:
        await self._stream.send_all(data)
        self._out_bytes -= len(data)  # the backlog counts bytes the kernel has not taken yet

    # -- receiving --------------------------------------------------------------------------
    #
    # One task at a time receives from the socket: normally the link's reader task, but a task
    # waiting for an event on this link borrows the socket (`receive_until`) so the event is
    # handled in the task that wants it. That saves a task switch per notification on each
    # side (~20 µs here, half the bare socket round trip), the difference between a doorbell
    # that costs one socket round trip and one that costs two.

    def _read_some(self) -> int | None:
        """Read what the socket has into the receive buffer: byte count, 0 at EOF, None if
        nothing is there yet."""
        try:
            return os.readv(self._fd, self._receive_buffers)
        except BlockingIOError:
            return None

    def _absorb(self, size: int) -> None:
        """Decode and handle every complete message in the first `size` received bytes."""
        unpacker = self._unpacker
        unpacker.feed(self._received[:size])  # copies: the buffer is reused at once
        handle = self.host.handle_message
        decoders = DECODERS
        for raw in unpacker:
            self.messages_received += 1
            if type(raw) is not list or not raw:
                raise ProtocolViolation(f"not a message: {raw!r:.80}")
            kind = raw[0]
            if kind == REPLY:
                self._on_reply(raw)
            elif type(kind) is int and kind in decoders:
                # The dispatch table inline: one call fewer per message than decode().
                handle(self, decoders[kind](raw))
            else:
                handle(self, decode(raw))  # raises the protocol violation

    def _receive_step(self) -> bool | None:
        """Read and handle one chunk: True if handled, None if nothing to read, False if the
        link is (now) dead. Failures kill the link with a reason, never propagate."""
        try:
            size = self._read_some()
            if size is None:
                return None
            if not size:
                self.dead = self.dead or f"domain {self.peer} closed the link"
                return False
            self._absorb(size)
            self._flush()  # replies to this chunk's requests leave now, in one write
            return True
        except OSError as exc:
            self.dead = self.dead or f"receive failed: {exc}"
        except (ProtocolViolation, msgpack.UnpackException, ValueError, TypeError) as exc:
            log.warning("link protocol violation", peer=self.peer, error=str(exc))
            self.dead = self.dead or f"protocol violation by domain {self.peer}: {exc}"
        except Exception as exc:  # a bug handling one peer's message must not end the domain
            log.error("link handler failed", peer=self.peer, exc_info=True)
            self.dead = self.dead or f"internal error handling domain {self.peer}: {exc!r}"
        return False

    async def _reader(self) -> None:
        while self.dead is None:
            self._reader_waking = False
            if self._borrowed:
                await self._reader_lot.park()  # the borrower unparks us when it leaves
                continue
            step = self._receive_step()
            if step is False:
                return
            if step is None:
                with trio.CancelScope() as self._reader_wait:  # a borrower may cancel it
                    await trio.lowlevel.wait_readable(self._fd)
                self._reader_wait = None
            else:
                # Let the tasks this chunk woke (event waiters, callers) run before this task
                # re-arms its socket wait: their answer is the next thing on the critical path.
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_until(self, done: Callable[[], bool]) -> bool:
        """Receive and handle messages in the calling task until `done()` holds.

        Returns False at once if another task is already receiving for the link (the caller
        then parks as usual). Returns True when `done()` holds, after `interrupt()` (the
        caller re-checks its condition), or when the link dies (the death itself is handled
        by the link's run task, which closes the ports). Before sleeping on the socket it
        polls briefly (busypoll.py).
        """
        if self._borrowed or self.dead is not None:
            return False
        self._borrowed = True
        reader_wait = self._reader_wait
        if reader_wait is not None:
            reader_wait.cancel()  # aborts the reader's socket wait synchronously
            self._reader_waking = True
        poll = self._poll
        yield_until = 0.0
        try:
            while not done() and self.dead is None:
                step = self._receive_step()
                if step is None:
                    if trio.lowlevel.current_statistics().tasks_runnable <= self._reader_waking:
                        # Spin only when no other task of ours could run: the spin blocks
                        # the trio loop. A reader woken by a borrower does not count: it
                        # would only park again.
                        step = poll.spin(self._receive_step)
                    elif poll.window > 0.0:
                        # Let them run first (a submitter at queue depth 1 is the one whose
                        # request produces the event we wait for), then look again, and
                        # spin if they are done: sleeping now would cost the CPU's wake-up.
                        # Bounded by the polling window, as the spin is.
                        now = time.perf_counter()
                        if not yield_until:
                            yield_until = now + poll.window
                        if now < yield_until:
                            await trio.lowlevel.checkpoint()
                            continue
                if step is None:
                    # The only slow path that needs a cancel scope: a sleep someone may cut
                    # short (interrupt()); scopes cost ~5 µs, too much for every wait.
                    started = time.perf_counter()
                    with trio.CancelScope() as self._borrower_wait:
                        await trio.lowlevel.wait_readable(self._fd)
                    self._borrower_wait = None
                    poll.blocked(time.perf_counter() - started)
                elif step is False:
                    self._scope.cancel()  # the run task sees `dead` and tears down
                    break
        except (trio.ClosedResourceError, OSError) as exc:
            self.dead = self.dead or f"receive failed: {exc}"
            self._scope.cancel()
        finally:
            self._borrowed = False
            self._borrower_wait = None
            if self._reader_lot.unpark_all():
                self._reader_waking = True
        return True

    def interrupt(self) -> None:
        """Cut short the socket wait of the task receiving for the link (receive_until)."""
        wait = self._borrower_wait
        if wait is not None:
            wait.cancel()

    def _on_reply(self, raw: list[Any]) -> None:
        if len(raw) < 2 or type(raw[1]) is not int:
            raise ProtocolViolation("malformed reply")
        call = self._pending.get(raw[1])
        if call is None or call.done.is_set():
            return  # a duplicate or a reply to a cancelled call
        # _on_reply checked the request id above; the reply type checks the field count.
        reply = call.reply_type.decode(raw)
        if call.abandoned:
            del self._pending[reply.req]
            if call.on_abandoned is not None:
                call.on_abandoned(reply)
            return
        if call.on_reply is None:
            call.result = reply
        else:
            try:
                call.result = call.on_reply(reply)
            except Exception as exc:
                call.error = exc
        call.done.set()

    def _die(self, reason: str) -> None:
        if self.dead is None or self.dead == reason:
            self.dead = reason
        else:
            reason = self.dead
        if self._died:
            return
        self._died = True
        error = PeerGone(f"domain {self.peer}: {reason}")
        for call in list(self._pending.values()):
            if call.abandoned:
                if call.on_abandoned is not None:
                    call.on_abandoned(None)  # no reply will come: just release local state
            elif not call.done.is_set():
                call.error = error
                call.done.set()
        self._dirty = []
        self._out = []
        self.host.link_died(self)


def socket_family(stream: trio.SocketStream) -> int:
    return int(stream.socket.family)


AF_UNIX = int(socket.AF_UNIX)
