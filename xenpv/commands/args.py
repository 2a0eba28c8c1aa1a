"""Typed argparse validators: every command checks its arguments at the CLI boundary.

Each function here is an argparse `type=`: it turns the text into a value or raises
`argparse.ArgumentTypeError`, which `ArgumentParser.error` prints as one line,
`xenpv <command>: error: argument --frames: expected a positive integer, got '0'`, and exit
status 2 (a usage error; errors found later, while running, exit 1). Nothing past the parser
sees a zero frame count, a negative timeout or a state directory that is really a file.

Paths are checked for what the command will do with them: read (`existing_file`), use or
create a directory (`directory`: refuses a path through a file, and does not create anything
itself), write a file into an existing directory (`output_file`), bind a Unix socket in an
existing directory (`socket_path`: a mistyped directory is an error, not a new tree).
Command lines meant for another machine (a container's, checked on the host) are parsed
inside `paths_elsewhere()`: their paths are checked for form only.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import structlog

from xenpv.errors import UsageError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MAX_PORT = 65535
_LOCAL_PATHS = contextvars.ContextVar("local_paths", default=True)
_N = TypeVar("_N", int, float)


@contextlib.contextmanager
def paths_elsewhere() -> Iterator[None]:
    """Parse command lines that will run on another machine (a container): path and file
    descriptor arguments are checked for form, not against this machine."""
    token = _LOCAL_PATHS.set(False)
    try:
        yield
    finally:
        _LOCAL_PATHS.reset(token)


def _elsewhere(text: str) -> bool:
    """True when paths are not this machine's (the caller then checks only the form)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return not _LOCAL_PATHS.get()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `xenpv demo: error: ...` and exit status 2 (the
    usage block argparse prints first would bury the one line that matters; `--help` has it).
    Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(what: str, text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def _integer(text: str, what: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        _fail(what, text)


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        _fail(what, text)
    if not math.isfinite(value):
        _fail(what, text)
    return value


def _checked(
    convert: Callable[[str, str], _N], what: str, ok: Callable[[_N], bool], name: str
) -> Callable[[str], _N]:
    """An argparse type: `convert` the text, then refuse a value that is not `ok`; named for
    argparse's messages."""

    def parse(text: str) -> _N:
        value = convert(text, what)
        if not ok(value):
            _fail(what, text)
        return value

    parse.__name__ = name
    return parse


positive_int = _checked(_integer, "a positive integer", lambda v: v > 0, "positive_int")
non_negative_int = _checked(_integer, "an integer >= 0", lambda v: v >= 0, "non_negative_int")
# Seconds and the like: finite and > 0.
positive_float = _checked(_number, "a number > 0", lambda v: v > 0, "positive_float")
non_negative_float = _checked(_number, "a number >= 0", lambda v: v >= 0, "non_negative_float")


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An integer in `low..high` (inclusive)."""
    what = f"an integer from {low} to {high}"
    return _checked(_integer, what, lambda v: low <= v <= high, f"int_{low}_{high}")


def byte_size(text: str) -> int:
    """A positive byte count: `4194304`, `4M`, `512K`, `1GiB`."""
    what = "a size in bytes such as 4194304 or 4M"
    match = _SIZE_RE.match(text)
    if match is None:
        _fail(what, text)
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value <= 0:
        _fail("a size > 0", text)
    return value


def existing_file(text: str) -> Path:
    """A file the command reads (topology, key file)."""
    if _elsewhere(text):
        return Path(text)
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return path


def existing_dir(text: str) -> Path:
    if _elsewhere(text):
        return Path(text)
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def directory(text: str) -> Path:
    """A directory the command uses or creates: an existing directory, or a path whose
    nearest existing ancestor is a writable directory (nothing in it may be a file)."""
    if _elsewhere(text):
        return Path(text)
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: exists and is not a directory")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot create it in {parent} (permission)")
    return path


def output_file(text: str) -> Path:
    """A file the command writes: its directory exists, and it is not a directory itself."""
    if _elsewhere(text):
        return Path(text)
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} does not exist")
    return path


def socket_path(text: str) -> str:
    """A Unix socket to bind: in an existing directory (a typo must not create a tree)."""
    if _elsewhere(text):
        return text
    path = Path(text)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: directory {parent} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory")
    return text


def _host_port(text: str, rest: str, *, allow_zero: bool, form: str = "HOST:PORT") -> None:
    host, sep, port = rest.rpartition(":")
    lowest = 0 if allow_zero else 1
    if not (sep and host.strip("[]") and port.isdigit() and lowest <= int(port) <= MAX_PORT):
        ports = f"{lowest}-{MAX_PORT}"
        raise argparse.ArgumentTypeError(f"expected {form} (port {ports}), got {text!r}")


def host_port(text: str) -> str:
    """`HOST:PORT` to listen on (`[::1]:0`; port 0 picks a free one)."""
    _host_port(text, text, allow_zero=True)
    return text


def _address(text: str, *, allow_zero: bool) -> str:
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix" and rest:
        return text
    if sep and kind == "tcp":
        _host_port(text, rest, allow_zero=allow_zero, form="tcp:HOST:PORT")
        return text
    raise argparse.ArgumentTypeError(f"expected unix:PATH or tcp:HOST:PORT, got {text!r}")


def xenstore_address(text: str) -> str:
    """Where xenstored answers: `unix:PATH` (dom0) or `tcp:HOST:PORT` (a domain)."""
    return _address(text, allow_zero=False)


def link_endpoint(text: str) -> str:
    """A domain's link endpoint to listen on: `unix:PATH` or `tcp:HOST:PORT`."""
    return _address(text, allow_zero=True)


def endpoint_template(text: str) -> str:
    """A link endpoint with `{name}` for the domain's name, e.g. `tcp:{name}:7100`."""
    try:
        _address(text.replace("{name}", "d"), allow_zero=False)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected unix:PATH or tcp:HOST:PORT, {{name}} for the domain's name, got {text!r}"
        ) from None
    return text


def fd_number(text: str) -> int:
    """An open file descriptor this process inherited (a readiness pipe)."""
    fd = _integer(text, "a file descriptor number")
    if fd < 0:
        _fail("a file descriptor number", text)
    if not _LOCAL_PATHS.get():
        return fd
    if fd <= 2:
        raise argparse.ArgumentTypeError(f"{fd} is stdin, stdout or stderr; expected a pipe")
    try:
        os.fstat(fd)
    except OSError:
        raise argparse.ArgumentTypeError(f"file descriptor {fd} is not open") from None
    return fd


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty text")
    return text


# -- option groups several commands share ------------------------------------------------------


def add_xenstore(
    parser: argparse.ArgumentParser, *, help: str | None = None, repeatable: bool = False
) -> None:
    """`--xenstore ADDR` (required): the xenstored the command talks to; `repeatable` collects
    a list."""
    parser.add_argument(
        "--xenstore",
        action="append" if repeatable else "store",
        required=True,
        type=xenstore_address,
        metavar="ADDR",
        help=help,
    )


def add_ready_fd(parser: argparse.ArgumentParser) -> None:
    """`--ready-fd N`: the pipe a daemon writes its READY line to once it serves."""
    parser.add_argument(
        "--ready-fd",
        type=fd_number,
        default=None,
        metavar="N",
        help="write a READY line to fd N",
    )


def add_metrics(parser: argparse.ArgumentParser) -> None:
    """`--metrics HOST:PORT`: serve the process's counters for Prometheus (docs/metrics.md)."""
    parser.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve operation counters in the Prometheus text format on HOST:PORT",
    )


def start_metrics(listen: str | None) -> None:
    """Start the `--metrics` endpoint (a daemon thread reading the counters), if asked."""
    if listen is None:
        return
    from xenpv.metrics.prometheus import serve

    try:
        server = serve(listen)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"--metrics {listen}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    structlog.get_logger().info("metrics serving", host=str(host), port=int(port))


def add_state_dir(parser: argparse.ArgumentParser, *, help: str) -> None:
    """`--state-dir DIR`, optional: where a run keeps its files (else a temporary directory)."""
    parser.add_argument("--state-dir", type=directory, default=None, metavar="DIR", help=help)


def add_round_options(
    parser: argparse.ArgumentParser, *, timeout_help: str, block_help: str
) -> None:
    """`--timeout`, `--block-bytes`, `--frames`: the sizes of a self-test round (the demo's
    check and `toolstack check`)."""
    parser.add_argument("--timeout", type=positive_float, default=60.0, help=timeout_help)
    parser.add_argument(
        "--block-bytes", type=byte_size, default=4 << 20, metavar="SIZE", help=block_help
    )
    parser.add_argument(
        "--frames", type=positive_int, default=24, help="echo frames per guest pair"
    )


def add_actions(
    sub: Any, name: str, *, help: str, dest: str = "action", metavar: str = "ACTION"
) -> Any:
    """`xenpv NAME ACTION ...`: a command whose first argument picks one of its actions; the
    returned object's `add_parser` adds each action."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest=dest, metavar=metavar, required=True)
