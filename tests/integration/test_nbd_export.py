"""The NBD export over a real blkfront, without external tools: a backend process killed and
restarted under NBD clients (only latency shows), and `xenpv nbd`'s own behaviour (read-only,
errors, readiness, clean stop) seen by the tests' NBD client."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import trio

from frontends.blkfront import attach
from tests.integration.blk_env import DEVICE, read_image
from tests.integration.conftest import Xenstored
from tests.integration.nbd_env import REPO, xenpv_nbd
from tests.integration.test_blk_crash import restartable_backend
from tests.unit.nbd_client import nbd_client
from xenpv.nbd import protocol as p
from xenpv.nbd.blkfront import BlkfrontDisk
from xenpv.nbd.protocol import Cmd
from xenpv.nbd.server import serve_nbd
from xenpv.toolstack.topology import VbdFeatures

DISK = 4 << 20
CLIENTS = 3


async def test_backend_restart_is_only_latency_for_nbd_clients(
    tmp_path: Path, xenstored: Xenstored
) -> None:
    """Writers keep several requests in flight over NBD while the backend process is killed
    (SIGKILL) and started again: every request succeeds, every acknowledged write is read
    back through NBD and is in the image file."""
    image = tmp_path / "disk.img"
    model = bytearray(DISK)
    acked = 0
    errors: list[int] = []
    with trio.fail_after(90):
        async with restartable_backend(
            tmp_path, xenstored.unix, "shm", 16384, image, DISK, VbdFeatures(queues=2)
        ) as rig:
            async with attach(rig.guest, rig.xs, DEVICE) as front, trio.open_nursery() as nursery:
                bound = await nursery.start(
                    serve_nbd, BlkfrontDisk(front), f"unix:{tmp_path}/n.sock"
                )
                milestones = {30: trio.Event(), 90: trio.Event()}
                stop = trio.Event()
                finished = trio.Event()
                running = CLIENTS

                async def client(index: int) -> None:
                    nonlocal acked
                    rng = random.Random(index)
                    region = DISK // CLIENTS // (4 * 4096) * 4 * 4096
                    async with nbd_client(bound.removeprefix("unix:")) as c:
                        while not stop.is_set():
                            # four writes in flight per connection, then their replies
                            batch = {}
                            for cookie in range(4):  # each in its own slot: no overlaps
                                length = rng.choice([4096, 16384, 65536])
                                slot = index * region + cookie * (region // 4)
                                offset = (
                                    slot + rng.randrange(0, (region // 4 - length) // 4096) * 4096
                                )
                                data = rng.randbytes(length)
                                batch[cookie] = (offset, data)
                                await c.send(Cmd.WRITE, offset, length, cookie=cookie, payload=data)
                            for _ in batch:
                                reply = await c.reply()
                                if reply.error:
                                    errors.append(reply.error)
                                    continue
                                offset, data = batch[reply.cookie]
                                model[offset : offset + len(data)] = data
                                acked += 1
                                for mark, event in milestones.items():
                                    if acked >= mark:
                                        event.set()
                        for start in range(index * region, (index + 1) * region, 1 << 20):
                            n = min(1 << 20, (index + 1) * region - start)
                            got = await c.call(Cmd.READ, start, n)
                            assert got.error == 0 and got.data == model[start : start + n]
                    nonlocal running
                    running -= 1
                    if not running:
                        finished.set()

                async with rig.backend() as first, trio.open_nursery() as clients:
                    await front.wait_connected()
                    for index in range(CLIENTS):
                        clients.start_soon(client, index)
                    await milestones[30].wait()
                    first.send_signal(signal.SIGKILL)  # requests are in flight
                    await first.wait()
                    async with rig.backend():
                        await milestones[90].wait()
                        stop.set()
                        await finished.wait()  # the read-back runs on this backend
                nursery.cancel_scope.cancel()
            assert not errors
            assert front.connections == 2
    assert read_image(image)[:DISK] == bytes(model)


def test_read_only_export_and_request_errors(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(os.urandom(2 << 20))
    with xenpv_nbd(image, "--read-only", "--page-size", "16K") as export:
        assert export.pid_file.read_text().strip() == str(export.process.pid)

        async def main() -> None:
            with trio.fail_after(60):
                async with nbd_client(str(export.socket)) as c:
                    assert c.negotiated.flags & p.FLAG_READ_ONLY
                    assert c.negotiated.size == 2 << 20
                    write = await c.call(Cmd.WRITE, 0, 512, payload=bytes(512))
                    assert write.error == p.EPERM
                    assert (await c.call(Cmd.WRITE_ZEROES, 0, 4096)).error == p.EPERM
                    got = await c.call(Cmd.READ, 4096, 8192)
                    assert got.error == 0 and got.data == image.read_bytes()[4096:12288]
                    assert (await c.call(Cmd.READ, 2 << 20, 512)).error == p.EINVAL

        trio.run(main)


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    good = tmp_path / "good.img"
    good.write_bytes(bytes(1 << 20))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args, expected in (
        ([str(tmp_path / "missing.img")], "No such file"),
        ([str(odd)], "not a positive multiple of 512"),
        ([str(tmp_path)], "not a regular file"),
        ([str(odd), "--page-size", "8K"], ""),
        ([str(odd), "--tcp", "nohost"], ""),
        ([str(good), "--socket", str(tmp_path / "no" / "dir.sock")], "cannot listen"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "xenpv", "nbd", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        # A bad argument or image is a usage error (2); a socket that cannot be bound, a failure.
        assert result.returncode == (1 if expected == "cannot listen" else 2), result.stderr
        assert result.stderr.startswith("xenpv: error: ") and expected in result.stderr
        assert "Traceback" not in result.stderr
