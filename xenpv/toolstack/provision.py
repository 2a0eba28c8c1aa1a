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

Applying is idempotent. The topology is first turned into a `Plan` (pure: what the store
must hold), then compared with what the store holds (`differences`, pure):
- a store with no domain but dom0 gets the plan created;
- a store that already holds exactly the plan (same domains with the same page size, memory
  and link endpoint, the same devices with the same configuration keys, and key files in
  `keys_dir` matching the published public keys) is left as it is: `Provisioned.created` is
  False. This is what lets a compose one-shot toolstack run again (`docker compose run`,
  a second `up`) against a live cluster;
- anything else is refused with the differences named, e.g. `domain 'guest4k': page size
  4096 in the store, 16384 in the topology`, and nothing is written. Runtime keys (device
  `state`, rings, features the ends negotiated) are not configuration and never compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.identity import TOOL_DOMAIN_ROOT, DomainKey, IdentityError, link_path, pubkey_path
from xenpv.toolstack import devices
from xenpv.toolstack import domains as toolstack
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.domains import ToolstackError
from xenpv.toolstack.topology import DomainSpec, Topology
from xenpv.xenbus.core import DEVICE_CLASSES, DeviceClass, DeviceId, xvd_number
from xenpv.xenstore.client import XenstoreClient

# At most this many differences are named in the error; the rest are counted.
MAX_DIFFERENCES_SHOWN = 6


# A device in the store: (class, frontend domid, backend domid, devid).
LiveDeviceId = tuple[DeviceClass, int, int, int]


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


@dataclass(slots=True)
class Provisioned:
    """What `apply_topology` did: domids by name, devices in topology order, and whether it
    created them (False: the store already held the topology and nothing was written)."""

    domids: dict[str, int] = field(default_factory=dict)
    devices: list[DeviceId] = field(default_factory=list)
    created: bool = True

    def name_of(self, domid: int) -> str:
        for name, d in self.domids.items():
            if d == domid:
                return name
        return str(domid)


@dataclass(frozen=True, slots=True)
class DomainPlan:
    name: str
    page_size: int
    memory: int
    endpoint: str
    max_maptrack: int | None = None  # create_domain's (larger for backends)
    max_event_channels: int | None = None  # create_domain's (larger for backends)


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device by its ends' names; keys are the toolstack's configuration keys, as text."""

    cls: DeviceClass
    frontend: str
    backend: str
    devid: int
    backend_keys: Mapping[str, str]
    frontend_keys: Mapping[str, str]
    config: VbdConfig | None = None  # vbd only
    mac: str = ""  # vif only
    tap: str | None = None  # vif only

    @property
    def label(self) -> str:
        return f"{self.cls} {self.devid} of {self.frontend!r} (backend {self.backend!r})"


@dataclass(frozen=True, slots=True)
class Plan:
    """What the store must hold for a topology (`plan_topology`)."""

    domains: tuple[DomainPlan, ...]
    devices: tuple[DevicePlan, ...]


def _text(keys: Mapping[str, str | int]) -> dict[str, str]:
    return {name: str(value) for name, value in keys.items()}


def plan_topology(
    topo: Topology, *, endpoint: Callable[[DomainSpec], str], image_dir: Path
) -> Plan:
    """The store contents `topo` asks for (pure). Device keys need no domids: a device's
    configuration keys depend only on its devid and configuration."""
    domains = tuple(
        DomainPlan(
            spec.name,
            spec.page_size,
            spec.memory,
            endpoint(spec),
            toolstack.BACKEND_MAX_MAPTRACK if spec.role == "backend" else None,
            toolstack.BACKEND_MAX_EVENT_CHANNELS if spec.role == "backend" else None,
        )
        for spec in topo.domains
    )
    planned: list[DevicePlan] = []
    per_guest: dict[tuple[str, str], int] = {}
    for vbd in topo.vbds:
        index = per_guest.get((vbd.frontend, "vbd"), 0)
        per_guest[(vbd.frontend, "vbd")] = index + 1
        config = VbdConfig(
            image=image_path(vbd.image, image_dir),
            size=vbd.size,
            read_only=vbd.read_only,
            sector_size=vbd.sector_size,
            features=vbd.features,
            nbd=nbd_address(vbd.nbd, image_dir),
        )
        devid = xvd_number(index)
        back, front = devices.vbd_keys(DeviceId("vbd", 0, 0, devid), config)
        planned.append(
            DevicePlan("vbd", vbd.frontend, vbd.backend, devid, _text(back), _text(front), config)
        )
    for vif in topo.vifs:
        index = per_guest.get((vif.frontend, "vif"), 0)
        per_guest[(vif.frontend, "vif")] = index + 1
        back, front = devices.vif_keys(DeviceId("vif", 0, 0, index), mac=vif.mac, tap=vif.tap)
        planned.append(
            DevicePlan(
                "vif",
                vif.frontend,
                vif.backend,
                index,
                _text(back),
                _text(front),
                mac=vif.mac,
                tap=vif.tap,
            )
        )
    return Plan(domains, tuple(planned))


@dataclass(frozen=True, slots=True)
class LiveDomain:
    name: str
    domid: int
    page_size: str | None
    memory: str | None
    endpoint: str | None
    pubkey: str | None


@dataclass(slots=True)
class LiveState:
    """What the store holds, read as dom0 (`read_live`): every domain but dom0, every device
    by (class, frontend domid, backend domid, devid), and for the devices the plan names, the
    values of the plan's keys (None: absent)."""

    domains: dict[str, LiveDomain] = field(default_factory=dict)
    devices: set[LiveDeviceId] = field(default_factory=set)
    keys: dict[LiveDeviceId, tuple[dict[str, str | None], dict[str, str | None]]] = field(
        default_factory=dict
    )


def _live_id(device: DevicePlan, domids: Mapping[str, int]) -> LiveDeviceId | None:
    if device.frontend not in domids or device.backend not in domids:
        return None
    return (device.cls, domids[device.frontend], domids[device.backend], device.devid)


async def _read_text(xs: XenstoreClient, path: str) -> str | None:
    raw = await xs.try_read(path)
    return None if raw is None else raw.decode("utf-8", "replace")


async def read_live(xs: XenstoreClient, plan: Plan) -> LiveState:
    """Read the part of the store `differences` compares with `plan`."""
    live = LiveState()
    domids = sorted(int(d) for d in await xs.try_directory("/local/domain") if d.isdigit())
    for domid in domids:
        name = await _read_text(xs, f"/local/domain/{domid}/name")
        if domid == 0 or name is None:
            continue
        tool = f"{TOOL_DOMAIN_ROOT}/{domid}"
        live.domains[name] = LiveDomain(
            name=name,
            domid=domid,
            page_size=await _read_text(xs, f"{tool}/page-size"),
            memory=await _read_text(xs, f"{tool}/memory"),
            endpoint=await _read_text(xs, link_path(domid)),
            pubkey=await _read_text(xs, pubkey_path(domid)),
        )
    for domain in live.domains.values():
        for cls in DEVICE_CLASSES:
            base = f"/local/domain/{domain.domid}/backend/{cls}"
            for fe in await xs.try_directory(base):
                for devid in await xs.try_directory(f"{base}/{fe}"):
                    if fe.isdigit() and devid.isdigit():
                        live.devices.add((cls, int(fe), domain.domid, int(devid)))
    by_name = {name: d.domid for name, d in live.domains.items()}
    for device in plan.devices:
        ident = _live_id(device, by_name)
        if ident is None or ident not in live.devices:
            continue
        dev = DeviceId(*ident)
        back = {k: await _read_text(xs, f"{dev.backend}/{k}") for k in device.backend_keys}
        front = {k: await _read_text(xs, f"{dev.frontend}/{k}") for k in device.frontend_keys}
        live.keys[ident] = (back, front)
    return live


def _compare(what: str, live: str | None, planned: str) -> list[str]:
    if live == planned:
        return []
    shown = "absent" if live is None else repr(live)
    return [f"{what}: {shown} in the store, {planned!r} in the topology"]


def differences(plan: Plan, live: LiveState) -> list[str]:
    """How the store differs from `plan`, one phrase each (pure); empty when it holds it."""
    out: list[str] = []
    planned_names = {d.name for d in plan.domains}
    for domain in plan.domains:
        have = live.domains.get(domain.name)
        if have is None:
            out.append(f"domain {domain.name!r} is not in the store")
            continue
        where = f"domain {domain.name!r}"
        out += _compare(f"{where} page size", have.page_size, str(domain.page_size))
        out += _compare(f"{where} memory", have.memory, str(domain.memory))
        out += _compare(f"{where} link endpoint", have.endpoint, domain.endpoint)
    for name in sorted(set(live.domains) - planned_names):
        out.append(f"domain {name!r} ({live.domains[name].domid}) is not in the topology")
    domids = {name: d.domid for name, d in live.domains.items()}
    planned_ids: set[LiveDeviceId] = set()
    for device in plan.devices:
        ident = _live_id(device, domids)
        if ident is None:
            continue  # its domain's absence is already named
        planned_ids.add(ident)
        if ident not in live.devices:
            out.append(f"{device.label} is not in the store")
            continue
        back, front = live.keys.get(ident, ({}, {}))
        for end, have_keys, want_keys in (
            ("backend", back, device.backend_keys),
            ("frontend", front, device.frontend_keys),
        ):
            for key, value in want_keys.items():
                out += _compare(f"{device.label} {end} {key}", have_keys.get(key), value)
    names = {d.domid: name for name, d in live.domains.items()}
    for cls, fe, be, devid in sorted(live.devices - planned_ids):
        out.append(
            f"{cls} {devid} of {names.get(fe, str(fe))!r} (backend {names.get(be, str(be))!r})"
            " is not in the topology"
        )
    return out


def _key_problem(path: Path, domain: LiveDomain) -> str | None:
    """Why the key file cannot serve the live `domain` (None: it can)."""
    if not path.exists():
        return f"key file {path} of domain {domain.name!r} is missing"
    try:
        key = DomainKey.load(path)
    except IdentityError as exc:
        return str(exc)
    if key.domid != domain.domid or key.public_hex() != domain.pubkey:
        return f"key file {path} is not the key of domain {domain.name!r} ({domain.domid})"
    return None


def _refusal(problems: list[str]) -> ToolstackError:
    shown = "; ".join(problems[:MAX_DIFFERENCES_SHOWN])
    more = len(problems) - MAX_DIFFERENCES_SHOWN
    if more > 0:
        shown += f"; and {more} more"
    return ToolstackError(
        f"the store holds a different topology ({shown}); nothing was changed"
        " (recreate xenstored to start over)"
    )


async def apply_topology(
    xs: XenstoreClient,
    topo: Topology,
    *,
    endpoint: Callable[[DomainSpec], str],
    keys_dir: Path,
    image_dir: Path,
) -> Provisioned:
    """Make the store hold `topo` through the dom0 client `xs` (see module): create it in an
    empty store, leave it if already there, refuse otherwise; `keys_dir` must exist."""
    plan = plan_topology(topo, endpoint=endpoint, image_dir=image_dir)
    live = await read_live(xs, plan)
    if not live.domains:
        return await _create(xs, plan, keys_dir)
    problems = differences(plan, live)
    if problems:
        raise _refusal(problems)
    key_problems = [
        problem
        for domain in plan.domains
        if (problem := _key_problem(keys_dir / f"{domain.name}.key", live.domains[domain.name]))
    ]
    if key_problems:
        raise _refusal(key_problems)
    domids = {d.name: live.domains[d.name].domid for d in plan.domains}
    return Provisioned(
        domids=domids,
        devices=[
            DeviceId(device.cls, domids[device.frontend], domids[device.backend], device.devid)
            for device in plan.devices
        ],
        created=False,
    )


async def _create(xs: XenstoreClient, plan: Plan, keys_dir: Path) -> Provisioned:
    done = Provisioned()
    for domain in plan.domains:
        created = await toolstack.create_domain(
            xs,
            name=domain.name,
            page_size=domain.page_size,
            memory_bytes=domain.memory,
            endpoint=domain.endpoint,
            max_maptrack=domain.max_maptrack,
            max_event_channels=domain.max_event_channels,
        )
        created.key.save(keys_dir / f"{domain.name}.key")
        done.domids[domain.name] = created.domid
    for ident, device in plan_devices(plan, done.domids):
        await create_device(xs, ident, device)
        done.devices.append(ident)
    return done


def plan_devices(plan: Plan, domids: Mapping[str, int]) -> list[tuple[DeviceId, DevicePlan]]:
    """The plan's devices with their ids, in creation order (see module rules); a launcher
    that re-creates one domain re-creates the devices it is an end of."""
    return [
        (DeviceId(d.cls, domids[d.frontend], domids[d.backend], d.devid), d) for d in plan.devices
    ]


async def create_device(xs: XenstoreClient, ident: DeviceId, device: DevicePlan) -> None:
    if device.config is not None:
        await devices.create_vbd(xs, ident, device.config)
    else:
        await devices.create_vif(xs, ident, mac=device.mac, tap=device.tap)
