"""Debian's xenstore-utils against `xenpv xenstored`.

libxenstore (Xen 4.17, `xs_daemon_socket()`) connects to `$XENSTORED_PATH` if set, else to
`$XENSTORED_RUNDIR/socket` (default /var/run/xenstored/socket); the tools open it with
`xs_open(0)`, which tries the socket first and /dev/xen/xenbus only if that fails. Setting
XENSTORED_PATH to our socket is all it takes.
"""

from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.conftest import running_xenstored, short_tempdir

pytestmark = pytest.mark.tools

TOOL_TIMEOUT = 20


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    with short_tempdir() as workdir, running_xenstored(workdir, tcp=False) as server:
        yield {**os.environ, "XENSTORED_PATH": server.socket}


def xs(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT
    )
    if check:
        assert result.returncode == 0, f"{args}: {result.returncode} {result.stderr}"
    return result


def test_write_read_exists_rm(env: dict[str, str]) -> None:
    xs(env, "xenstore-write", "/vm/1/name", "guest one", "/vm/1/uuid", "abc")
    assert xs(env, "xenstore-read", "/vm/1/name").stdout == "guest one\n"
    assert xs(env, "xenstore-read", "/vm/1/name", "/vm/1/uuid").stdout == "guest one\nabc\n"
    assert xs(env, "xenstore-exists", "/vm/1/uuid").returncode == 0
    xs(env, "xenstore-rm", "/vm/1/uuid")
    assert xs(env, "xenstore-exists", "/vm/1/uuid", check=False).returncode != 0
    missing = xs(env, "xenstore-read", "/vm/1/uuid", check=False)
    assert missing.returncode != 0 and "couldn't read path" in missing.stderr


def test_list_and_ls(env: dict[str, str]) -> None:
    for name in ("c", "a", "b"):
        xs(env, "xenstore-write", f"/tree/{name}", f"value-{name}")
    xs(env, "xenstore-write", "/tree/a/deep", "x")
    assert xs(env, "xenstore-list", "/tree").stdout.split() == ["c", "a", "b"]
    ls = xs(env, "xenstore-ls", "/tree").stdout.splitlines()
    assert [line.strip() for line in ls] == [
        'c = "value-c"',
        'a = "value-a"',
        'deep = "x"',
        'b = "value-b"',
    ]
    whole = xs(env, "xenstore-ls", "/").stdout
    assert "tool = " in whole and "tree = " in whole


def test_chmod_and_ls_perms(env: dict[str, str]) -> None:
    xs(env, "xenstore-write", "/perm/node", "v")
    xs(env, "xenstore-chmod", "/perm/node", "n0", "r5", "w7")
    out = xs(env, "xenstore-ls", "-p", "/perm").stdout
    assert "(n0,r5,w7)" in out
    xs(env, "xenstore-chmod", "-r", "/perm", "b3")
    out = xs(env, "xenstore-ls", "-p", "/perm").stdout
    assert "(b3)" in out and "(n0,r5,w7)" not in out


def test_watch_with_count(env: dict[str, str]) -> None:
    xs(env, "xenstore-write", "/watched", "0")
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/watched"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], TOOL_TIMEOUT)
        assert ready, "xenstore-watch printed nothing"
        first = proc.stdout.readline()  # the immediate event: the watch is registered
        assert first.strip() == "/watched"
        xs(env, "xenstore-write", "/watched/child", "1")
        rest, err = proc.communicate(timeout=TOOL_TIMEOUT)
        assert proc.returncode == 0, err
        assert rest.strip() == "/watched/child"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
