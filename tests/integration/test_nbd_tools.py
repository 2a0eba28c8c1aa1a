"""Real block tools through `xenpv nbd`: every byte goes NBD → blkfront → ring → blkback →
image. qemu-img, qemu-io, nbdinfo and fio's nbd engine (Debian: qemu-utils, libnbd-bin,
fio); marker `tools`. Images are a few MiB to keep the time small."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.nbd_env import NbdExport, need_tools, run_tool, xenpv_nbd
from tests.unit.nbd_client import nbd_client
from xenpv.nbd import protocol as p
from xenpv.nbd.protocol import Cmd

pytestmark = pytest.mark.tools
MiB = 1 << 20


def image(path: Path, size: int, *, random: bool) -> Path:
    path.write_bytes(os.urandom(size) if random else bytes(size))
    return path


@pytest.mark.parametrize("granule", ["on", "off"])
@pytest.mark.parametrize("page_size", ["4K", "16K", "64K"])
def test_qemu_img_convert_in_and_out(tmp_path: Path, page_size: str, granule: str) -> None:
    need_tools("qemu-img", "nbdinfo")
    source = image(tmp_path / "source.img", 3 * MiB, random=True)
    disk = image(tmp_path / "disk.img", 3 * MiB, random=False)
    back = tmp_path / "back.img"
    with xenpv_nbd(disk, "--page-size", page_size, "--granule", granule) as export:
        info = json.loads(run_tool("nbdinfo", "--json", export.uri).stdout)["exports"][0]
        # the preferred block is the grant size: the guest's page with the granule, else 4 KiB
        page = {"4K": 4096, "16K": 16384, "64K": 65536}[page_size]
        assert info["block_size_preferred"] == (page if granule == "on" else 4096)
        into = run_tool(
            "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), export.uri
        )
        assert into.returncode == 0, into.stderr + export.log()
        out = run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", export.uri, str(back))
        assert out.returncode == 0, out.stderr
    assert back.read_bytes() == source.read_bytes()
    assert disk.read_bytes() == source.read_bytes()  # and it really is in the image


@pytest.fixture(scope="module")
def export64k(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdExport]:
    """One 64 KiB-page guest with the granule, shared by the tests below."""
    path = image(tmp_path_factory.mktemp("nbd") / "disk.img", 8 * MiB, random=True)
    with xenpv_nbd(path, "--page-size", "64K") as export:
        yield export


def test_nbdinfo_reports_size_and_block_sizes(export64k: NbdExport) -> None:
    need_tools("nbdinfo")
    result = run_tool("nbdinfo", "--json", export64k.uri)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)["exports"][0]
    assert info["export-size"] == 8 * MiB
    assert (info["block_size_minimum"], info["block_size_preferred"]) == (512, 65536)
    assert info["block_size_maximum"] >= MiB
    assert info["can_flush"] and info["can_fua"] and info["can_zero"] and info["can_multi_conn"]


def test_qemu_io_patterns_at_unaligned_offsets(export64k: NbdExport) -> None:
    need_tools("qemu-io")
    spans = [(1, 1), (511, 2), (4095, 8193), (65535, 70001), (3 * MiB + 7, 300000)]
    commands: list[str] = []
    for i, (offset, length) in enumerate(spans):
        commands += ["-c", f"write -P {0x11 * (i + 1)} {offset} {length}"]
    for i, (offset, length) in enumerate(spans):
        commands += ["-c", f"read -P {0x11 * (i + 1)} {offset} {length}"]
    result = run_tool("qemu-io", "-f", "raw", *commands, export64k.uri)
    assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, (
        result.stdout + result.stderr
    )
    assert result.stdout.count("read ") == len(spans)


def test_fio_random_writes_verify(export64k: NbdExport) -> None:
    need_tools("fio")
    result = run_tool(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={export64k.uri}",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=4M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 4 * MiB


def test_bad_clients_get_errors_while_another_keeps_working(export64k: NbdExport) -> None:
    need_tools("qemu-io")

    async def main() -> None:
        with trio.fail_after(60):
            async with nbd_client(str(export64k.socket)) as good:
                # a broken handshake: the server hangs up on that client alone
                async with nbd_client(str(export64k.socket), negotiate=False) as bad:
                    await bad.stream.send_all(b"not an option header at all")
                    assert await bad.at_eof()
                # out-of-range and misaligned requests get the spec's errors
                size = good.negotiated.size
                assert (await good.call(Cmd.READ, size, 4096)).error == p.EINVAL
                full = await good.call(Cmd.WRITE, size - 512, 1024, payload=bytes(1024))
                assert full.error == p.ENOSPC
                assert (await good.call(Cmd.READ, 100, 512)).error == p.EINVAL
                data = os.urandom(65536)
                assert (await good.call(Cmd.WRITE, 65536, 65536, payload=data)).error == 0
                assert (await good.call(Cmd.READ, 65536, 65536)).data == data

    trio.run(main)
    # and a real tool, on its own connection, still works
    result = run_tool(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 4096",
        "-c",
        "read -P 0x5a 0 4096",
        export64k.uri,
    )
    assert result.returncode == 0 and "verification failed" not in result.stdout, result.stdout
