"""A fork server for domain processes: each domain costs a fork, not an interpreter start.

As multiprocessing's `forkserver`: the supervisor starts one plain process (no trio run, no
threads) that imports the domain runtime and every driver once, then forks a child per
request. A child shares the imported code pages with its siblings (copy-on-write) and starts
in milliseconds; it is still one process per domain, in its own session, with its output in
its own log, and runs exactly `xenpv ARGS` (`xenpv.cli.main`).

    python -m xenpv.toolstack.forkserver --socket PATH --ready-fd N

Protocol, one Unix stream connection per child: the client sends one JSON line
`{"args": [...], "log": PATH, "env": {...}}`; the server answers `pid N`, and `exit CODE`
(trio's convention: negative = killed by that signal) when it reaps that child. The
supervisor records a forked child like a spawned one (`ForkedProcess` has what
`trio.Process` offers it: pid, returncode, send_signal, wait); the fork server is stopped after
the domains (`supervisor.STOP_ORDER`), so every exit status reaches the supervisor. Were the
fork server gone first, `wait` falls back to the pid (status unknown, as for `cluster down`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

# What a domain process imports: loaded once here, shared by every child.
PRELOAD = (
    "xenpv.cli",
    "xenpv.runtime.domain_process",
    "backends.blkback",
    "backends.netback",
    "backends.switch",
    "frontends.blkfront",
    "frontends.netfront",
)
REQUEST_MAX = 1 << 20


# -- the server (synchronous: it must fork from a process that runs no event loop) ----------


def _child(
    request: Mapping[str, object],
    inherited: Sequence[socket.socket | int],
    parser: argparse.ArgumentParser,
) -> None:
    """In the forked child: become `xenpv ARGS` in its own session; never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for item in inherited:  # the server's sockets and pipe: not the child's business
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
        os.setsid()
        with contextlib.suppress(OSError):  # what ps and top show (its argv stays the server's)
            Path("/proc/self/comm").write_text(str(request.get("name", "xenpv"))[:15])
        log_fd = os.open(str(request["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        env = request.get("env")
        if isinstance(env, dict):
            os.environ.clear()
            os.environ.update({str(k): str(v) for k, v in env.items()})
        args = [str(a) for a in request["args"]]  # type: ignore[attr-defined]
        sys.argv = ["xenpv", *args]
        code = importlib.import_module("xenpv.cli").main(args, parser)  # preloaded
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child's own failure: its log says why
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _read_request(conn: socket.socket) -> dict[str, object] | None:
    data = b""
    while not data.endswith(b"\n") and len(data) < REQUEST_MAX:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    try:
        request = json.loads(data)
    except ValueError:
        return None
    if not isinstance(request, dict) or not isinstance(request.get("args"), list):
        return None
    return request


def serve(socket_path: Path, ready_fd: int | None) -> int:
    """Preload, listen, fork on request, report exits; until SIGTERM (default action)."""
    for module in PRELOAD:
        importlib.import_module(module)
    # The whole command line, built once: building it imports every command module and
    # registers a few hundred arguments (about 0.1 s of CPU a child otherwise pays).
    parser: argparse.ArgumentParser = importlib.import_module("xenpv.cli").build_parser()
    # OpenSSL initialises itself on first use (tens of ms): pay that once, here.
    importlib.import_module("xenpv.identity").DomainKey.generate(0)
    # Keep the preloaded objects out of the children's collections: a collection touches
    # every tracked object's header, which would copy each shared page into every child.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener.bind(str(socket_path))
    listener.listen(128)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the selector
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "reap")
    waiting: dict[int, socket.socket] = {}
    if ready_fd is not None:
        os.write(ready_fd, b"READY\n")
        os.close(ready_fd)
    while True:
        for key, _mask in selector.select():
            if key.data == "accept":
                conn, _ = listener.accept()
                conn.setblocking(True)
                request = _read_request(conn)
                if request is None:
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request, [listener, conn, wake_r, wake_w, *waiting.values()], parser)
                conn.sendall(f"pid {pid}\n".encode())
                waiting[pid] = conn
            else:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
                _reap(waiting)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xenpv.toolstack.forkserver")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)
    return serve(args.socket, args.ready_fd)


# -- the client side, in the supervisor -----------------------------------------------------


class ForkedProcess:
    """A child of the fork server, as the supervisor sees it (what it uses of trio.Process)."""

    def __init__(self, pid: int, stream: trio.SocketStream, rest: bytes) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._stream = stream
        self._buffer = rest
        self._lock = trio.Lock()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        async with self._lock:
            if self.returncode is not None:
                return self.returncode
            line = await _read_line(self._stream, self._buffer)
            if line is not None and line.startswith(b"exit "):
                self.returncode = int(line.split()[1])
            else:  # the fork server is gone: wait on the pid itself, status unknown
                await _wait_pid_gone(self.pid)
                self.returncode = -int(signal.SIGKILL)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.aclose()
            return self.returncode


async def _read_line(stream: trio.SocketStream, buffer: bytes) -> bytes | None:
    while b"\n" not in buffer:
        try:
            chunk = await stream.receive_some(4096)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        if not chunk:
            return None
        buffer += chunk
    return buffer.partition(b"\n")[0]


def _alive(pid: int) -> bool:
    """Running, not a zombie (as `supervisor.alive`; this module is below the supervisor)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


async def _wait_pid_gone(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        while _alive(pid):
            with trio.move_on_after(0.5):
                await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def fork(
    socket_path: Path,
    args: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None,
    name: str = "xenpv",
) -> ForkedProcess:
    """Ask the fork server at `socket_path` for `xenpv ARGS` with output to `log_path`."""
    stream = await trio.open_unix_socket(str(socket_path))
    request = {
        "args": list(args),
        "log": str(log_path),
        "env": dict(env or os.environ),
        "name": f"xenpv-{name}",
    }
    await stream.send_all(json.dumps(request).encode() + b"\n")
    buffer = b""
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            await stream.aclose()
            raise OSError("the fork server closed the connection without forking")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    words = line.split()
    if len(words) != 2 or words[0] != b"pid" or not words[1].isdigit():
        await stream.aclose()
        raise OSError(f"the fork server answered {line[:80]!r}")
    return ForkedProcess(int(words[1]), stream, rest)


if __name__ == "__main__":
    sys.exit(main())
