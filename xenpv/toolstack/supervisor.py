"""One supervisor for every command that starts processes (demo, cluster up, interop, ...).

    code = supervisor.run(main, Supervisor(state_file=dir / "cluster.json"))
    # main(sup) spawns with `await sup.spawn(...)`; whatever happens, every child is stopped

Rules it enforces, so that no command has to get them right by itself:
- every child is recorded (in memory and, with a `state_file`, on disk) right after its
  spawn, in a shielded step: a cancellation can never lose a process between the fork and
  the record;
- SIGINT and SIGTERM are received with `trio.open_signal_receiver` (never as a
  KeyboardInterrupt in the middle of some await): the first one cancels the command, whose
  exit then stops every child in order (guests, then backends, then xenstored), each group
  with a bounded grace period before SIGKILL; a second signal SIGKILLs everything at once;
- one exit-code convention: 0 ok, 1 failure, 2 usage, 130 interrupted (`EXIT_*`).

Children run in their own sessions, so a Ctrl-C typed at the terminal reaches only the
supervisor, which decides the order.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from xenpv.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, XenpvError
from xenpv.toolstack.forkserver import ForkedProcess
from xenpv.toolstack.forkserver import fork as forked

log = structlog.get_logger()

STOP_GRACE = 10.0
REAP_TIMEOUT = 5.0  # after SIGKILL: only a process stuck in the kernel takes longer
LOG_TAIL = 1500
# Stop order: whatever uses a device first (guests, workers), then what serves it, then the
# store everything talks through.
# The fork server (xenpv.toolstack.forkserver) reports its children's exits: it goes after them.
STOP_ORDER = ("guest", "backend", "forkserver", "xenstored")
SUPERVISOR = "supervisor"  # the kind of a child that is itself a supervisor (stopped first)
SUPERVISOR_GRACE = 4 * STOP_GRACE  # it stops its own children, each group with STOP_GRACE


@dataclass(slots=True)
class Child:
    """A process a supervisor started (or, for `down`, found in a state file)."""

    name: str
    kind: str  # "xenstored" | "backend" | "guest" | SUPERVISOR
    pid: int
    log: Path
    domid: int | None = None
    proc: trio.Process | ForkedProcess | None = None

    def tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text[-LOG_TAIL:].strip()

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return alive(self.pid)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "pid": self.pid,
            "log": str(self.log),
            "domid": self.domid,
        }


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def describe_status(code: int) -> str:
    """A process's exit status as trio reports it (negative: killed by that signal)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def stop_popen(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """Stop a child started with `subprocess.Popen`: SIGTERM if it still runs, up to `timeout`
    seconds to exit (its pipes drained meanwhile), then SIGKILL. Its exit status, or None when
    it had to be killed."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None
    return proc.returncode


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


@dataclass(eq=False)
class Supervisor:
    """The processes one command started; see the module doc."""

    state_file: Path | None = None
    # What the command adds to the state file (addresses, domains, ...): called on each save.
    describe: Callable[[], dict[str, Any]] = dict
    children: list[Child] = field(default_factory=list)
    interrupted: bool = False  # a first SIGINT/SIGTERM arrived
    killed: bool = False  # a second one: SIGKILL, no grace
    # A signal is the normal way to end this command (a foreground cluster): exit 0.
    signal_is_normal_stop: bool = False
    _grace: trio.CancelScope | None = None

    # -- recording ----------------------------------------------------------------------------

    async def spawn(
        self,
        name: str,
        kind: str,
        args: Sequence[str],
        log_path: Path,
        *,
        domid: int | None = None,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        forkserver: Path | None = None,
        stdout: int | None = None,
        stdin: int | None = None,
    ) -> Child:
        """Start a child in its own session (output to `log_path`) and record it. With
        `forkserver` (its socket), `args` are `xenpv`'s and the fork server forks the child
        (`xenpv.toolstack.forkserver`); it is recorded, signalled and reaped the same way.
        `stdout=subprocess.PIPE` gives the caller its stdout (`child.proc.stdout`) instead,
        `stdin=subprocess.PIPE` a pipe to its stdin (spawned children only; otherwise
        stdin is /dev/null)."""
        if forkserver is not None and (stdout is not None or stdin is not None):
            raise ValueError("a forked child's stdout goes to its log, its stdin is /dev/null")
        # Shielded: the fork and the record happen together or not at all.
        with trio.CancelScope(shield=True):
            proc: trio.Process | ForkedProcess
            if forkserver is not None:
                proc = await forked(forkserver, args, log_path, env, name)
            else:
                proc = await _open_process(args, log_path, pass_fds, env, stdout, stdin)
            child = Child(name, kind, proc.pid, log_path, domid, proc)
            self.children.append(child)
            self.save()
            if self.killed:  # a second signal came while it started
                _kill(child)
        log.debug("process started", process=name, pid=proc.pid)
        return child

    def record(self, name: str, kind: str, pid: int, log_path: Path) -> Child:
        """Record a child that synchronous code started (`subprocess.Popen`, in its own
        session) right after its start; `stop` signals it by pid and waits on a pidfd, so
        its starter must still reap it (`Popen.wait`)."""
        child = Child(name, kind, pid, log_path)
        self.children.append(child)
        self.save()
        # Started after an interrupt (a bench's worker thread between its check and its
        # Popen): `stop` may already have passed, so it goes now.
        if self.killed or self.interrupted:
            _kill(child)
        return child

    def forget(self, child: Child) -> None:
        """Drop a `record`ed child its starter has reaped: its pid may be reused."""
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        self.save()

    def state(self) -> dict[str, Any]:
        return self.describe() | {
            "supervisor": os.getpid(),
            "processes": [c.to_json() for c in self.children],
        }

    def save(self) -> None:
        if self.state_file is not None:
            write_json_atomically(self.state_file, self.state())

    # -- stopping -----------------------------------------------------------------------------

    def escalate(self) -> None:
        """A second signal: SIGKILL every child now; `stop` waits for nothing more (but a
        supervisor child gets the signal too, and a moment to kill its own children)."""
        self.killed = True
        for child in self.children:
            _kill(child)
        if self._grace is not None:
            self._grace.cancel()

    async def stop(
        self,
        before_xenstored: Callable[[], Awaitable[None]] | None = None,
        grace: float = STOP_GRACE,
        *,
        xenstored: bool = True,
    ) -> None:
        """Stop every child in STOP_ORDER (other kinds first); `before_xenstored` runs (bounded,
        errors ignored) while xenstored still does, e.g. to remove the domains' records.
        `xenstored=False` leaves xenstored running (its own clients close first)."""
        with trio.CancelScope(shield=True):
            supervisors = [c for c in self.children if c.kind == SUPERVISOR]
            await self.terminate(supervisors, SUPERVISOR_GRACE)
            others = [c for c in self.children if c.kind not in (*STOP_ORDER, SUPERVISOR)]
            await self.terminate(others, grace)
            for kind in STOP_ORDER[:-1]:
                await self.terminate([c for c in self.children if c.kind == kind], grace)
            store_runs = any(c.kind == "xenstored" and c.running for c in self.children)
            if before_xenstored is not None and store_runs and not self.killed:
                with trio.move_on_after(5), contextlib.suppress(Exception):
                    await before_xenstored()
            if xenstored:
                await self.terminate([c for c in self.children if c.kind == "xenstored"], grace)

    async def terminate(self, children: list[Child], grace: float = STOP_GRACE) -> None:
        """SIGTERM, wait up to `grace` seconds (none once escalated), SIGKILL what is left."""
        children = [c for c in children if c.running]
        if not children:
            return
        for child in children:
            if self.killed:
                _kill(child)
            else:
                _signal(child, signal.SIGTERM)
        if not self.killed:
            with trio.CancelScope(shield=True) as self._grace:
                self._grace.deadline = trio.current_time() + grace
                await _reap_all(children)
            self._grace = None
        if self.killed and any(c.kind == SUPERVISOR for c in children):
            with trio.move_on_after(REAP_TIMEOUT):  # it is killing its own children
                await _reap_all(children)
        for child in children:
            if child.running:
                if not self.killed:
                    log.warning("killing a process that did not stop", process=child.name)
                _signal(child, signal.SIGKILL)
        with trio.move_on_after(REAP_TIMEOUT):
            await _reap_all(children)


async def _open_process(
    args: Sequence[str],
    log_path: Path,
    pass_fds: Sequence[int],
    env: dict[str, str] | None,
    stdout: int | None = None,
    stdin: int | None = None,
) -> trio.Process:
    with _open_log(log_path) as logf:
        return await trio.lowlevel.open_process(
            list(args),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=logf if stdout is None else stdout,
            stderr=logf,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
            env=env,
        )


def _kill(child: Child) -> None:
    # A supervisor child (a detached cluster's) counts signals as we do: a second SIGTERM
    # makes it SIGKILL its own children; SIGKILL would leave them running.
    _signal(child, signal.SIGTERM if child.kind == SUPERVISOR else signal.SIGKILL)


def _open_log(path: Path) -> Any:
    return open(path, "ab")  # the caller closes it


def _signal(child: Child, sig: int) -> None:
    if child.proc is not None:
        if child.proc.returncode is None:
            child.proc.send_signal(sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(child.pid, sig)


async def wait_exit(child: Child) -> int | None:
    """Wait for `child` to exit; its status if it is ours to reap."""
    if child.proc is not None:
        return await child.proc.wait()
    try:
        fd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        return None
    try:
        while alive(child.pid):  # a zombie of another parent also reads as exited
            with trio.move_on_after(0.5):
                await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
    return None


async def _reap_all(children: list[Child]) -> None:
    async with trio.open_nursery() as nursery:
        for child in children:
            nursery.start_soon(wait_exit, child)


# -- running a command ------------------------------------------------------------------------


def run(main: Callable[[Supervisor], Awaitable[int]], sup: Supervisor) -> int:
    """`trio.run` of `main(sup)` under the supervisor's signal handling; returns the exit
    code. Errors `main` raises propagate (the CLI turns them into one line and status 1)
    after every child has been stopped."""
    return trio.run(_supervised, main, sup)


async def _supervised(main: Callable[[Supervisor], Awaitable[int]], sup: Supervisor) -> int:
    code = EXIT_FAILURE
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            body = trio.CancelScope()
            nursery.start_soon(_on_signals, signals, body, sup)
            try:
                with body:
                    code = await main(sup)
            except* XenpvError:
                # What an interrupted start-up raises (a process that did not get ready...)
                # is not the user's problem: they asked it to stop.
                if not sup.interrupted:
                    raise
            finally:
                await sup.stop()  # normally a no-op: `main` stopped what it started
                nursery.cancel_scope.cancel()
    if sup.killed or (sup.interrupted and not sup.signal_is_normal_stop):
        return EXIT_INTERRUPTED
    if sup.interrupted:
        return EXIT_OK  # the signal ended it as it should (e.g. a foreground cluster)
    return code


async def _on_signals(signals: Any, body: trio.CancelScope, sup: Supervisor) -> None:
    async for signum in signals:
        if not sup.interrupted:
            sup.interrupted = True
            name = signal.Signals(signum).name
            log.info("stopping", signal=name)
            if sys.stderr.isatty() and not sup.signal_is_normal_stop:
                print("xenpv: stopping (Ctrl-C again to kill at once)", file=sys.stderr)
            body.cancel()
        else:
            log.warning("second signal: killing every process")
            sup.escalate()


# -- the state directory's owner ----------------------------------------------------------------

LOCK_FILE = "lock"


class StateDirBusy(XenpvError):
    """Another live supervisor owns the state directory."""


def lock_state_dir(state_dir: Path, busy: Callable[[int | None], str]) -> int:
    """Take the state directory's lock (flock, held until `unlock_state_dir` or the process's
    death: a stale lock from a dead process is simply taken over). Returns its fd; raises
    StateDirBusy(busy(holder pid)) if a live process holds it."""
    path = state_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StateDirBusy(busy(holder)) from None
        # Its previous owner may have removed the file between our open and our flock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_state_dir(state_dir: Path, fd: int) -> None:
    (state_dir / LOCK_FILE).unlink(missing_ok=True)
    os.close(fd)


def lock_holder(state_dir: Path) -> int | None:
    """The pid of the live process that holds the state directory's lock (0 if unknown),
    or None if nobody does."""
    try:
        fd = os.open(state_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None  # closing the fd releases our shared lock
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    raw = os.pread(fd, 32, 0).strip()
    return int(raw) if raw.isdigit() else None


# -- temporary state directories ------------------------------------------------------------------


def run_in_temp_dir(
    prefix: str,
    main: Callable[[Supervisor, Path], Awaitable[int]],
    sup: Supervisor,
    *,
    parent: Path | None = None,
) -> int:
    """`run(main)` with a fresh state directory under /tmp (or `parent`), removed at the end
    whatever happens; on a failure (not an interruption) its `logs/` stay and their place is
    printed."""
    state_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))  # $TMPDIR, else /tmp
    failed = True
    error: BaseException | None = None
    try:
        code = run(functools.partial(_with_dir, main, state_dir), sup)
        failed = code == EXIT_FAILURE
        return code
    except BaseException as exc:
        failed, error = not sup.interrupted, exc
        raise
    finally:
        # A Ctrl-C now would stop the removal half-way: it waits until the removal is done.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            kept = remove_temp_dir(state_dir, keep_logs=failed and not sup.interrupted)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if kept is not None:
            note = f"xenpv: logs kept in {kept}"
            if error is not None:
                error.add_note(note)  # the CLI prints it under the error line
            else:
                print(note, file=sys.stderr)


async def _with_dir(
    main: Callable[[Supervisor, Path], Awaitable[int]], state_dir: Path, sup: Supervisor
) -> int:
    return await main(sup, state_dir)


def remove_temp_dir(state_dir: Path, *, keep_logs: bool) -> Path | None:
    """Remove a temporary state directory; after a failure keep its `logs/` (the domains'
    own account of what went wrong) and return where they are."""
    logs = state_dir / "logs"
    if not keep_logs or not logs.is_dir() or not any(logs.iterdir()):
        shutil.rmtree(state_dir, ignore_errors=True)
        return None
    for entry in state_dir.iterdir():
        if entry != logs:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return logs
