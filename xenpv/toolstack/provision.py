"""Apply a topology as the toolstack (dom0): create its domains and write its devices.

    async with connect("unix:/run/xenpv/xenstored.sock") as xs:       # dom0
        done = await apply_topology(
            xs, topo, endpoint=lambda spec: f"tcp:{spec.name}:7100",
            keys_dir=Path("/var/lib/xenpv/keys"), image_dir=Path("/var/lib/xenpv/images"),
        )

One implementation for every launcher: the local cluster (`xenpv.toolstack.cluster`) and the
docker-compose one-shot toolstack (`xenpv toolstack apply`) differ only in where a domain's
link endpoint is (a Unix socket in a state directory, a free local TCP port, or the
container's host name) and where keys and images live.

Rules (the same as the local launcher's):
- domains are created in file order (`toolstack.create_domain`: lowest free domid ≥ 1);
- each domain's secret goes to `keys_dir/<name>.key`, mode 0600 (`DomainKey.save`);
- vbd `devid`s are xvda, xvdb, ... per guest (`virtual-device` numbers, as xl does),
  vif `devid`s 0, 1, ... per guest;
- a relative image path is taken under `image_dir`; the backend creates a missing image.
A domain whose name is already in the store is refused (a second `apply` on the same
xenstored would otherwise give a second domain the same name, and key files would clash).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.toolstack import devices
from xenpv.toolstack import domains as toolstack
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.domains import ToolstackError
from xenpv.toolstack.topology import DomainSpec, Topology
from xenpv.xenbus.core import DeviceId, xvd_number
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import XsError


@dataclass(slots=True)
class Provisioned:
    """What `apply_topology` created: domids by name, devices in creation order."""

    domids: dict[str, int] = field(default_factory=dict)
    devices: list[DeviceId] = field(default_factory=list)

    def name_of(self, domid: int) -> str:
        for name, d in self.domids.items():
            if d == domid:
                return name
        return str(domid)


def image_path(image: str | None, image_dir: Path) -> str | None:
    """The path the backend opens: absolute as given, relative under `image_dir`."""
    if image is None:
        return None
    path = Path(image)
    return str(path if path.is_absolute() else (image_dir / path).resolve())


def nbd_address(address: str | None, base: Path) -> str | None:
    """An NBD export address as the guest listens: a relative Unix path under `base`."""
    if address is None or not address.startswith("unix:"):
        return address
    return f"unix:{image_path(address[len('unix:') :], base)}"


async def existing_names(xs: XenstoreClient) -> dict[str, int]:
    """Names of the domains already in the store (dom0 view)."""
    try:
        domids = [int(d) for d in await xs.directory("/local/domain") if d.isdigit()]
    except XsError as exc:
        if exc.errno_name != "ENOENT":
            raise
        return {}
    names: dict[str, int] = {}
    for domid in domids:
        raw = await xs.try_read(f"/local/domain/{domid}/name")
        if raw is not None and domid != 0:
            names[raw.decode("utf-8", "replace")] = domid
    return names


async def apply_topology(
    xs: XenstoreClient,
    topo: Topology,
    *,
    endpoint: Callable[[DomainSpec], str],
    keys_dir: Path,
    image_dir: Path,
) -> Provisioned:
    """Create every domain and device of `topo` through the dom0 client `xs` (see module);
    `keys_dir` must exist."""
    clash = sorted(set(await existing_names(xs)) & {d.name for d in topo.domains})
    if clash:
        raise ToolstackError(
            f"domain {clash[0]!r} already exists in xenstore (was this topology applied before?)"
        )
    done = Provisioned()
    for spec in topo.domains:
        created = await toolstack.create_domain(
            xs,
            name=spec.name,
            page_size=spec.page_size,
            memory_bytes=spec.memory,
            endpoint=endpoint(spec),
        )
        created.key.save(keys_dir / f"{spec.name}.key")
        done.domids[spec.name] = created.domid
    per_guest: dict[tuple[str, str], int] = {}
    for vbd in topo.vbds:
        index = per_guest.get((vbd.frontend, "vbd"), 0)
        per_guest[(vbd.frontend, "vbd")] = index + 1
        device = DeviceId(
            "vbd", done.domids[vbd.frontend], done.domids[vbd.backend], xvd_number(index)
        )
        config = VbdConfig(
            image=image_path(vbd.image, image_dir),
            size=vbd.size,
            read_only=vbd.read_only,
            sector_size=vbd.sector_size,
            features=vbd.features,
            nbd=nbd_address(vbd.nbd, image_dir),
        )
        await devices.create_vbd(xs, device, config)
        done.devices.append(device)
    for vif in topo.vifs:
        index = per_guest.get((vif.frontend, "vif"), 0)
        per_guest[(vif.frontend, "vif")] = index + 1
        device = DeviceId("vif", done.domids[vif.frontend], done.domids[vif.backend], index)
        await devices.create_vif(xs, device, mac=vif.mac, tap=vif.tap)
        done.devices.append(device)
    return done
