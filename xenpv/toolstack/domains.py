"""Domain creation and destruction, as the toolstack (dom0) does it through xenstore.

`create_domain` allocates the domid (lowest free ≥ 1, or the one asked for), writes
`/local/domain/<id>/{name,domid}`, issues the domain's secret (an Ed25519 `DomainKey`),
publishes its public key and link endpoint, and INTRODUCEs it. `destroy_domain` removes
those nodes and RELEASEs it, which fires `@releaseDomain`; domain runtimes that watch it
(`xenpv.runtime.lifecycle.watch_releases`) close their links to the released domain, so its peers
see its ports close and their mappings of its grants fail.

Permissions:
- `/local/domain/<id>` is owned by the domain (`n<id>`: the domain may create its own
  nodes, nobody else reads them; dom0 is privileged), like the subtrees xl gives a guest;
  `name` and `domid` are dom0's, read-only for the domain (`n0`, `r<id>`), so a guest can
  read but not rename itself.
- `/tool/xenpv/domain/<id>/{pubkey,link}` are dom0's and readable by every domain (`r0`).
  A private subtree (readable by dom0 and that domain only) would do for the endpoint; xenpv
  deliberately publishes it to all, because a peer must find the endpoint to dial it and
  every link authenticates both ends (docs/hypervisor.md), so knowing an endpoint grants
  nothing. The public key is public by nature. The secret never enters xenstore: the caller
  hands `CreatedDomain.key` to the domain process (e.g. a key file, `DomainKey.save`).
"""

from __future__ import annotations

from dataclasses import dataclass

from xenpv.errors import XenpvError
from xenpv.hv.memory import PAGE_SIZES
from xenpv.identity import TOOL_DOMAIN_ROOT, DomainKey, link_path, pubkey_path
from xenpv.xenstore.client import Transaction, XenstoreClient
from xenpv.xenstore.wire import XsError

DOMID_FIRST_RESERVED = 0x7FF0
XENSTORE_RING_GFN = 0
XENSTORE_RING_PORT = 1


class ToolstackError(XenpvError):
    """A domain cannot be created or destroyed as asked."""


@dataclass(frozen=True, slots=True)
class CreatedDomain:
    domid: int
    key: DomainKey


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


async def _used_domids(tx: Transaction) -> set[int]:
    used: set[int] = {0}
    for parent in ("/local/domain", TOOL_DOMAIN_ROOT):
        try:
            names = await tx.directory(parent)
        except XsError as exc:
            if exc.errno_name != "ENOENT":
                raise
            continue
        used.update(int(n) for n in names if n.isdigit())
    return used


async def _publish(tx: Transaction, domid: int, pubkey_hex: str, endpoint: str) -> None:
    tool = f"{TOOL_DOMAIN_ROOT}/{domid}"
    await tx.mkdir(tool)
    await tx.set_perms(tool, ["r0"])
    for path, value in ((pubkey_path(domid), pubkey_hex), (link_path(domid), endpoint)):
        await tx.write(path, value)
        await tx.set_perms(path, ["r0"])


async def publish_link(xs: XenstoreClient, domid: int, pubkey_hex: str, endpoint: str) -> None:
    """Publish a domain's public key and link endpoint (dom0's own, or after a move)."""

    async def publish(tx: Transaction) -> None:
        await _publish(tx, domid, pubkey_hex, endpoint)

    await xs.transact(publish)


MAX_MAPTRACK = "max-maptrack"  # under /tool/xenpv/domain/<id>/
# A backend domain maps its frontends' rings and buffers: Xen's default maptrack for a
# domain is gnttab_max_maptrack_frames (1024) frames of 512 entries.
BACKEND_MAX_MAPTRACK = 1024 * 512
MAX_EVENT_CHANNELS = "max-event-channels"  # under /tool/xenpv/domain/<id>/
# ... and binds a port per ring: the FIFO event channel ABI's 2^17 ports.
BACKEND_MAX_EVENT_CHANNELS = 1 << 17


async def create_domain(
    xs: XenstoreClient,
    *,
    name: str,
    page_size: int,
    memory_bytes: int,
    endpoint: str,
    domid: int | None = None,
    max_maptrack: int | None = None,
    max_event_channels: int | None = None,
) -> CreatedDomain:
    """Create a domain's xenstore presence and secret; returns its domid and key.
    `max_maptrack`: how many grants it may map at once (xl's `max_maptrack_frames`, in
    entries; None: the hypervisor's default, `xenpv.hv.domain.DEFAULT_MAX_MAPS`);
    `max_event_channels`: its ports (xl's `max_event_channels`; None: `hv.ports.MAX_PORTS`)."""
    if page_size not in PAGE_SIZES:
        raise ToolstackError(f"page size {page_size} not one of {PAGE_SIZES}")
    if memory_bytes <= 0 or memory_bytes % page_size:
        raise ToolstackError(f"memory {memory_bytes} is not a positive multiple of {page_size}")
    if not name or "\0" in name:
        raise ToolstackError("a domain needs a non-empty name")
    if domid is not None and not 1 <= domid < DOMID_FIRST_RESERVED:
        raise ToolstackError(f"domid {domid} not in 1..{DOMID_FIRST_RESERVED - 1}")

    async def make(tx: Transaction) -> CreatedDomain:
        used = await _used_domids(tx)
        if domid is not None:
            if domid in used:
                raise ToolstackError(f"domain {domid} already exists")
            chosen = domid
        else:
            chosen = next(i for i in range(1, DOMID_FIRST_RESERVED) if i not in used)
        key = DomainKey.generate(chosen)
        base = domain_path(chosen)
        await tx.mkdir(base)
        await tx.set_perms(base, [f"n{chosen}"])
        for node, value in (("name", name), ("domid", str(chosen))):
            await tx.write(f"{base}/{node}", value)
            await tx.set_perms(f"{base}/{node}", ["n0", f"r{chosen}"])
        await _publish(tx, chosen, key.public_hex(), endpoint)
        tool = f"{TOOL_DOMAIN_ROOT}/{chosen}"
        numbers = [("page-size", page_size), ("memory", memory_bytes)]
        if max_maptrack is not None:
            numbers.append((MAX_MAPTRACK, max_maptrack))
        if max_event_channels is not None:
            numbers.append((MAX_EVENT_CHANNELS, max_event_channels))
        for leaf, number in numbers:
            await tx.write(f"{tool}/{leaf}", str(number))
            await tx.set_perms(f"{tool}/{leaf}", ["r0"])
        return CreatedDomain(chosen, key)

    created = await xs.transact(make)
    # xenpv domains reach xenstored over authenticated TCP, not a shared ring: the ring's gfn
    # and event channel are placeholders (C xenstored refuses port 0, so port 1).
    await xs.introduce(created.domid, XENSTORE_RING_GFN, XENSTORE_RING_PORT)
    return created


async def destroy_domain(xs: XenstoreClient, domid: int) -> None:
    """Remove the domain's nodes, then RELEASE it (→ `@releaseDomain`), in xl's order."""
    if not 1 <= domid < DOMID_FIRST_RESERVED:
        raise ToolstackError(f"domid {domid} cannot be destroyed")

    async def remove(tx: Transaction) -> None:
        await tx.rm(domain_path(domid))
        await tx.rm(f"{TOOL_DOMAIN_ROOT}/{domid}")

    await xs.transact(remove)
    try:
        await xs.release(domid)
    except XsError as exc:
        if exc.errno_name != "ENOENT":
            raise
