"""Toolstack domain create/destroy against a real xenstored, with domains finding each
other through xenstore and noticing a release."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv.hv import EventChannelClosed, LinkError, PeerGone, open_domain
from xenpv.identity import DomainKey, link_path, pubkey_path
from xenpv.runtime.directory import XenstoreDirectory
from xenpv.runtime.lifecycle import open_published_domain
from xenpv.toolstack.domains import ToolstackError, create_domain, destroy_domain, publish_link
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import XsError


async def test_create_publishes_and_destroy_releases(xenstored: Xenstored) -> None:
    with trio.fail_after(30):
        async with connect(xenstored.unix) as xs:
            first = await create_domain(
                xs, name="guest", page_size=4096, memory_bytes=1 << 20, endpoint="unix:/x"
            )
            second = await create_domain(
                xs, name="other", page_size=65536, memory_bytes=1 << 20, endpoint="tcp:h:1"
            )
            assert (first.domid, second.domid) == (1, 2)
            assert first.key.domid == 1
            assert await xs.read_text("/local/domain/1/name") == "guest"
            assert await xs.read_text("/local/domain/1/domid") == "1"
            assert await xs.get_perms("/local/domain/1") == ["n1"]
            assert await xs.get_perms("/local/domain/1/name") == ["n0", "r1"]
            assert await xs.read_text(pubkey_path(1)) == first.key.public_hex()
            assert await xs.read_text(link_path(2)) == "tcp:h:1"
            assert await xs.get_perms(link_path(1)) == ["r0"]
            assert await xs.is_domain_introduced(1)
            with pytest.raises(ToolstackError):
                await create_domain(
                    xs, name="dup", page_size=4096, memory_bytes=1 << 20, endpoint="x", domid=2
                )
            with pytest.raises(ToolstackError):
                await create_domain(xs, name="bad", page_size=8192, memory_bytes=8192, endpoint="x")

            async with xs.watch("@releaseDomain") as events:
                await events.__anext__()  # the initial event
                await destroy_domain(xs, 1)
                await events.__anext__()
            assert not await xs.is_domain_introduced(1)
            assert await xs.try_read(pubkey_path(1)) is None
            with pytest.raises(XsError):
                await xs.read("/local/domain/1")
            third = await create_domain(
                xs, name="again", page_size=4096, memory_bytes=1 << 20, endpoint="unix:/y"
            )
            assert third.domid == 1  # lowest free


async def test_domains_link_through_xenstore_and_see_release(
    xenstored: Xenstored, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with connect(xenstored.unix) as dom0_xs:
            back_key = DomainKey.generate(0)
            await publish_link(dom0_xs, 0, back_key.public_hex(), f"unix:{tmp_path}/dom0.sock")
            guest = await create_domain(
                dom0_xs,
                name="guest",
                page_size=4096,
                memory_bytes=4 << 20,
                endpoint=f"unix:{tmp_path}/dom1.sock",
            )
            async with (
                connect(xenstored.tcp, key=guest.key) as guest_xs,
                open_published_domain(
                    dom0_xs,
                    domid=0,
                    key=back_key,
                    endpoint=f"unix:{tmp_path}/dom0.sock",
                ) as back,
                open_domain(
                    domid=guest.domid,
                    key=guest.key,
                    directory=XenstoreDirectory(guest_xs),
                    endpoint=await guest_xs.read_text(link_path(guest.domid)),
                    memory_bytes=4 << 20,
                ) as front,
            ):
                page = front.alloc_pages(1)[0]
                gref = front.grants.grant_access(0, page.frame)
                port = await front.alloc_unbound(0)
                mapping = await back.map_grants(guest.domid, [gref])
                channel = await back.bind_interdomain(guest.domid, port.port)
                channel.notify()
                await port.wait()

                await destroy_domain(dom0_xs, guest.domid)
                with pytest.raises(EventChannelClosed):
                    await channel.wait()
                with pytest.raises(PeerGone):
                    mapping.written(0, 1)
                with pytest.raises(EventChannelClosed):
                    await port.wait()  # the guest side sees its peer go too
                # the released guest cannot be linked again: its key is no longer published
                with pytest.raises(LinkError, match="no published"):
                    await back.connect(guest.domid)
