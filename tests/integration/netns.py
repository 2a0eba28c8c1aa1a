"""A throw-away multi-host lab: one network namespace per "host", all joined by a bridge.

    with NetnsLab(["xenstored", "backend", "guest4k"]) as lab:
        argv = lab.exec_argv("backend", ["python", "-m", "xenpv", ...])

Layout (nothing is created in the caller's namespace):
- a bridge namespace `<prefix>-br` holding bridge `br0`;
- per host a namespace `<prefix>-<i>` with `lo` up and `eth0` (one end of a veth pair, the
  other end a port of `br0`), address `10.213.<net>.<10+i>/24`, private to these namespaces;
- `/etc/netns/<ns>/hosts` naming every host, which `ip netns exec` bind-mounts over
  `/etc/hosts`: a host reaches another by its name, as containers do on a compose network.
With `binds`, a process also gets a private mount namespace with directories bind-mounted at
the container paths of its volumes, so commands run exactly as written in the compose file.
Leaving the block deletes the namespaces (which deletes the veths and the bridge), the
`/etc/netns` files and any empty mount point it had to create, whatever happened; processes
still inside must be stopped before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ETC_NETNS = Path("/etc/netns")


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    ns: str
    ip: str


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class NetnsLab:
    def __init__(self, names: list[str], *, net: int | None = None) -> None:
        self.prefix = f"xpvmh{os.getpid()}"
        self.net = net if net is not None else 1 + os.getpid() % 250
        self.bridge_ns = f"{self.prefix}-br"
        self.hosts = {
            name: Host(name, f"{self.prefix}-{i}", f"10.213.{self.net}.{10 + i}")
            for i, name in enumerate(names)
        }
        self._made: list[str] = []
        self._dirs: list[Path] = []  # empty mount points created on this machine

    def __enter__(self) -> NetnsLab:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # whatever happened in the block

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _setup(self) -> None:
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{h.ip} {h.name}\n" for h in self.hosts.values()
        )
        for i, host in enumerate(self.hosts.values()):
            self._add_ns(host.ns)
            port = f"p{i}"
            ip("-n", host.ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
               "netns", self.bridge_ns)  # fmt: skip
            ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            ip("-n", host.ns, "link", "set", "eth0", "up")
            etc = ETC_NETNS / host.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)

    def exec_argv(
        self, name: str, argv: list[str], binds: Mapping[str, Path] | None = None
    ) -> list[str]:
        """`argv` run inside host `name`'s namespace (`ip netns exec` execs it: same pid).

        `binds` (mount point → directory) gives it a private mount namespace with those
        directories bind-mounted, like a container's volumes; a mount point missing on this
        machine is created empty (see `mountpoint`) and removed by `close`."""
        prefix = ["ip", "netns", "exec", self.hosts[name].ns]
        if not binds:
            return [*prefix, *argv]
        # Mount points under others go last: /tmp (a private /tmp) after the volumes whose
        # directories may live under the real /tmp. The code being tested and the Python
        # running it may themselves live under /tmp (a CI clone, a virtualenv): they are
        # bind-mounted into the private /tmp at their own paths first, and /tmp is mounted
        # recursively so they stay visible.
        pairs: list[tuple[str, str]] = []
        if "/tmp" in binds:
            for code in _code_dirs():
                if code.is_relative_to("/tmp"):
                    inner = binds["/tmp"] / code.relative_to("/tmp")
                    inner.mkdir(parents=True, exist_ok=True)
                    pairs.append((str(code), str(inner)))
        order = sorted(binds, key=lambda t: (t == "/tmp", t))
        for target in order:
            self.mountpoint(target)
        pairs += [(str(binds[t]), t) for t in order]
        script = "".join(
            f'mount --rbind "${{{2 * i + 1}}}" "${{{2 * i + 2}}}"; ' for i in range(len(pairs))
        )
        return [
            *prefix,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
            script + f'shift {2 * len(pairs)}; exec "$@"',
            "sh",
            *(arg for pair in pairs for arg in pair),
            *argv,
        ]

    def mountpoint(self, target: str) -> None:
        path = Path(target)
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for directory in reversed(missing):
            directory.mkdir()
            self._dirs.append(directory)

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self._made.clear()
        for directory in reversed(self._dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._dirs.clear()
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only if empty: other users' entries stay


def _code_dirs() -> list[Path]:
    """What the commands run need from this machine: the code under test (the repository,
    for an editable install) and the interpreter running it (`sys.prefix`, a virtualenv that
    may live under /tmp, and `sys.base_prefix`, the Python it was made from), each as given
    and resolved; a directory inside another listed one is left out (bound with it)."""
    import xenpv

    found: list[Path] = []
    for path in (Path(xenpv.__file__).parents[1], Path(sys.prefix), Path(sys.base_prefix)):
        for candidate in (path.absolute(), path.resolve()):
            if candidate not in found:
                found.append(candidate)
    return [p for p in found if not any(p != q and p.is_relative_to(q) for q in found)]
