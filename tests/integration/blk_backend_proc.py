"""A backend domain in its own process serving one vbd with blkback (until `xenpv domain`
exists), for the blk tests that need a real process boundary (and `kill -9`).

    python tests/integration/blk_backend_proc.py XS_ADDRESS SEED_HEX ENDPOINT TRANSPORT
        GUEST_DOMID GUEST_ENDPOINT GUEST_PUBKEY DEVID

Domain 0 with the given key seed and link endpoint; prints {"ready": endpoint} once
listening, then serves the vbd until killed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backends.blkback import serve
from xenpv import log
from xenpv.hv import StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import connect


async def main(argv: list[str]) -> None:
    xs_address, seed_hex, endpoint, transport, guest, guest_endpoint, guest_pubkey, devid = argv
    key = DomainKey.from_seed_hex(0, seed_hex)
    directory = StaticDirectory()
    directory.register(int(guest), guest_endpoint, guest_pubkey)
    async with (
        open_domain(
            domid=0,
            key=key,
            directory=directory,
            endpoint=endpoint,
            transport=transport,
            memory_bytes=32 << 20,
        ) as dom,
        connect(xs_address) as xs,
    ):
        sys.stdout.write(json.dumps({"ready": dom.endpoint}) + "\n")
        sys.stdout.flush()
        await serve(dom, xs, DeviceId("vbd", int(guest), 0, int(devid)))


if __name__ == "__main__":
    log.configure(os.environ.get("BLK_BACKEND_LOG", "warning"), json=True)
    trio.run(main, sys.argv[1:])
