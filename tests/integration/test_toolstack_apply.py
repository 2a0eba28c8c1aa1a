"""`xenpv toolstack apply` is idempotent against a real xenstored: the same topology again
changes nothing, a different one is refused naming the difference and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from tests.integration.conftest import Xenstored
from xenpv.toolstack.topology import DEFAULT_TOPOLOGY_TOML
from xenpv.xenstore.client import connect

TIMEOUT = 60


def apply(xenstored: Xenstored, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "xenpv", "--log-level", "warning", "toolstack", "apply",
            *extra, "--xenstore", xenstored.unix, "--keys-dir", str(workdir / "keys"),
            "--image-dir", str(workdir / "images"), "--json",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )  # fmt: skip


def dump(xenstored: Xenstored) -> dict[str, bytes | None]:
    """Every node of the store and its value (dom0 view)."""

    async def walk() -> dict[str, bytes | None]:
        nodes: dict[str, bytes | None] = {}
        with trio.fail_after(TIMEOUT):
            async with connect(xenstored.unix) as xs:
                pending = ["/local", "/tool"]
                while pending:
                    path = pending.pop()
                    nodes[path] = await xs.try_read(path)
                    pending += [f"{path}/{c}" for c in await xs.try_directory(path)]
        return nodes

    return trio.run(walk)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("xenpv:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_same_topology_twice_then_a_different_one(xenstored: Xenstored, xs_workdir: Path) -> None:
    first = apply(xenstored, xs_workdir)
    assert first.returncode == 0, first.stderr
    created = json.loads(first.stdout.splitlines()[-1])
    assert created["created"] is True
    store = dump(xenstored)

    again = apply(xenstored, xs_workdir)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1]) == {**created, "created": False}
    assert "unchanged" in again.stderr
    assert dump(xenstored) == store

    other = xs_workdir / "other.toml"
    other.write_text(DEFAULT_TOPOLOGY_TOML.replace('page_size = "64K"', 'page_size = "16K"'))
    refused = error_line(apply(xenstored, xs_workdir, str(other)))
    assert "different topology" in refused
    assert "domain 'guest64k' page size: '65536' in the store, '16384' in the topology" in refused
    assert dump(xenstored) == store


def test_a_lost_key_file_is_named(xenstored: Xenstored, xs_workdir: Path) -> None:
    assert apply(xenstored, xs_workdir).returncode == 0
    (xs_workdir / "keys" / "guest4k.key").unlink()
    line = error_line(apply(xenstored, xs_workdir))
    assert "guest4k.key of domain 'guest4k' is missing" in line
