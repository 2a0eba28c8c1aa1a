"""The `unix:PATH` / `tcp:HOST:PORT` addresses that link endpoints, xenstored and NBD exports
are given as, sans-IO. Each caller checks the port range it accepts and raises its own error."""

from __future__ import annotations


def split_address(text: str) -> tuple[str, str, int] | None:
    """`unix:PATH` → ("unix", PATH, 0); `tcp:HOST:PORT` → ("tcp", HOST, PORT), HOST without
    the brackets of `[v6]`; None for anything else. The port is any run of digits."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return "unix", rest, 0
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return "tcp", host.strip("[]"), int(port)
    return None
