"""The cluster's status, read from xenstore only: domains, devices, both xenbus states, what
each device negotiated, and the guests' self-check results.

`read_status(xs)` gathers raw keys (the I/O); `device_status` / `domain_status` turn raw keys
into records (pure, unit-tested); `render` draws rich tables; `ClusterStatus.to_json()` is
the `--json` form.

Where each column comes from (the keys the drivers publish: docs/blk.md, docs/net.md):
- states: `<frontend dir>/state` and `<backend dir>/state`;
- ring order: the frontend's `ring-page-order` (absent: a one-page ring, order 0; vif rings
  are always one page);
- queues: the frontend's `multi-queue-num-queues` (absent: one queue);
- indirect: the backend's `feature-max-indirect-segments` (what the frontend may use; vbd);
- persistent: `feature-persistent` written by both ends (vbd);
- grant size: `4096 << grant-granule-order` (docs/granule-extension.md: the order the backend
  accepted, echoed in its directory at connect; before that the frontend's; absent: the
  4 KiB baseline).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.identity import TOOL_DOMAIN_ROOT
from xenpv.xenbus.core import DEVICE_CLASSES, XVD_MAJOR, DeviceId, parse_state, xvd_name
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import XsError

GRANULE_ORDER = "grant-granule-order"
FRONTEND_KEYS = (
    "state",
    "ring-page-order",
    "multi-queue-num-queues",
    "feature-persistent",
    GRANULE_ORDER,
)
BACKEND_KEYS = ("state", "feature-max-indirect-segments", "feature-persistent", GRANULE_ORDER)
MAX_GRANULE_ORDER = 4
DEVICE_ERRORS = "xenpv/device-errors"
CHECKS = "xenpv/checks"


@dataclass(frozen=True, slots=True)
class DomainStatus:
    domid: int
    name: str
    page_size: int | None
    memory: int | None
    pid: int | None  # the domain process's pid once it is ready


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    cls: str
    devid: int
    frontend: str
    frontend_domid: int
    backend: str
    backend_domid: int
    frontend_state: str
    backend_state: str
    ring_page_order: int | None
    queues: int | None
    indirect_segments: int | None
    persistent: bool | None
    grant_size: int
    error: str | None = None

    @property
    def connected(self) -> bool:
        return self.frontend_state == "Connected" and self.backend_state == "Connected"


@dataclass(slots=True)
class ClusterStatus:
    domains: list[DomainStatus] = field(default_factory=list)
    devices: list[DeviceStatus] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "domains": [asdict(d) for d in self.domains],
            "devices": [asdict(d) | {"connected": d.connected} for d in self.devices],
            "checks": self.checks,
        }


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def domain_status(domid: int, keys: Mapping[str, str]) -> DomainStatus:
    """`keys`: `name`, `page-size`, `memory`, `ready` (any may be missing)."""
    return DomainStatus(
        domid=domid,
        name=keys.get("name", f"domain-{domid}"),
        page_size=_int(keys.get("page-size")),
        memory=_int(keys.get("memory")),
        pid=_int(keys.get("ready")),
    )


def device_status(
    device: DeviceId,
    frontend: Mapping[str, str],
    backend: Mapping[str, str],
    names: Mapping[int, str],
    error: str | None = None,
) -> DeviceStatus:
    """One device's record from the raw keys of both of its directories."""
    fe_state = parse_state(frontend.get("state")).short
    be_state = parse_state(backend.get("state")).short
    queues = _int(frontend.get("multi-queue-num-queues"))
    if device.cls == "vbd":
        order = _int(frontend.get("ring-page-order"))
        indirect = _int(backend.get("feature-max-indirect-segments"))
        persistent: bool | None = (
            frontend.get("feature-persistent") == "1" and backend.get("feature-persistent") == "1"
        )
        if order is None and "state" in frontend and fe_state in ("Initialised", "Connected"):
            order = 0
        indirect = indirect if indirect is not None else 0
    else:
        order = 0 if fe_state == "Connected" else None
        indirect = None
        persistent = None
    if queues is None and fe_state in ("Initialised", "Connected"):
        queues = 1
    granule = _int(backend.get(GRANULE_ORDER))
    if granule is None:
        granule = _int(frontend.get(GRANULE_ORDER))
    if granule is None or not 0 <= granule <= MAX_GRANULE_ORDER:
        granule = 0  # absent (the baseline) or junk a guest wrote: shown as the baseline
    return DeviceStatus(
        cls=device.cls,
        devid=device.devid,
        frontend=names.get(device.frontend_domid, str(device.frontend_domid)),
        frontend_domid=device.frontend_domid,
        backend=names.get(device.backend_domid, str(device.backend_domid)),
        backend_domid=device.backend_domid,
        frontend_state=fe_state,
        backend_state=be_state,
        ring_page_order=order,
        queues=queues,
        indirect_segments=indirect,
        persistent=persistent,
        grant_size=XEN_PAGE_SIZE << granule,
        error=error,
    )


async def _dir(xs: XenstoreClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except XsError as exc:
        if exc.errno_name == "ENOENT":
            return []
        raise


async def _read(xs: XenstoreClient, path: str) -> str | None:
    raw = await xs.try_read(path)
    return None if raw is None else raw.decode("utf-8", "replace")


async def _keys(xs: XenstoreClient, base: str, names: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        value = await _read(xs, f"{base}/{name}")
        if value is not None:
            out[name] = value
    return out


async def read_status(xs: XenstoreClient) -> ClusterStatus:
    """Everything `cluster status` shows, from xenstore (a dom0 client)."""
    status = ClusterStatus()
    domids = sorted(int(d) for d in await _dir(xs, "/local/domain") if d.isdigit())
    names: dict[int, str] = {}
    for domid in domids:
        keys = await _keys(xs, f"/local/domain/{domid}", ("name", "xenpv/ready"))
        keys |= await _keys(xs, f"{TOOL_DOMAIN_ROOT}/{domid}", ("page-size", "memory"))
        if "xenpv/ready" in keys:
            keys["ready"] = keys.pop("xenpv/ready")
        if domid == 0 and "page-size" not in keys:
            continue  # dom0 is the toolstack here, not a domain process
        dom = domain_status(domid, keys)
        names[domid] = dom.name
        status.domains.append(dom)
    for domid in domids:
        base = f"/local/domain/{domid}"
        for cls in DEVICE_CLASSES:
            for fe in await _dir(xs, f"{base}/backend/{cls}"):
                for devid in await _dir(xs, f"{base}/backend/{cls}/{fe}"):
                    if not (fe.isdigit() and devid.isdigit()):
                        continue
                    device = DeviceId(cls, int(fe), domid, int(devid))
                    be = await _keys(xs, device.backend, BACKEND_KEYS)
                    front = await _keys(xs, device.frontend, FRONTEND_KEYS)
                    error = None
                    for owner in (device.backend_domid, device.frontend_domid):
                        key = f"{DEVICE_ERRORS}/{cls}-{fe}-{devid}"
                        error = error or await _read(xs, f"/local/domain/{owner}/{key}")
                    status.devices.append(device_status(device, front, be, names, error))
        for check in sorted(await _dir(xs, f"{base}/{CHECKS}")):
            raw = await _read(xs, f"{base}/{CHECKS}/{check}")
            try:
                value = json.loads(raw or "")
            except ValueError:
                value = {"name": check, "ok": False, "detail": f"unreadable result {raw!r}"}
            if isinstance(value, dict):
                status.checks.append({"domain": names.get(domid, str(domid))} | value)
    return status


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _opt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def device_label(cls: str, devid: int) -> str:
    """`vbd xvda` for Linux's xvd numbers, else `vif0`, `vbd768`."""
    if cls == "vbd" and devid >> 8 == XVD_MAJOR and devid & 0xF == 0:
        return f"vbd {xvd_name((devid >> 4) & 0xF)}"
    return f"{cls}{devid}"


# Short xenbus state names for the 80-column devices table (the legend under it spells
# out the ones that are not obvious).
STATE_ABBREVIATIONS = {
    "Unknown": "Unknown",
    "Initialising": "Initing",
    "InitWait": "InitWait",
    "Initialised": "Inited",
    "Connected": "Conn",
    "Closing": "Closing",
    "Closed": "Closed",
    "Reconfiguring": "Reconfing",
    "Reconfigured": "Reconfed",
}
DEVICES_LEGEND = (
    "state: frontend/backend xenbus state (Conn = Connected, Initing = Initialising, "
    "Inited = Initialised); ring: ring page order; q: queues; ind: max indirect "
    "segments; pers: persistent grants; grant: grant size"
)


def short_state(state: str) -> str:
    return STATE_ABBREVIATIONS.get(state, state)


def _table(title: str, columns: tuple[str, ...]) -> Any:
    """A table whose cells wrap (never end in an ellipsis) when 80 columns are too few."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def render(status: ClusterStatus) -> list[Any]:
    """rich renderables, sized for an 80-column terminal: the domains table, the devices
    table and its legend (plus one line per device error), the checks table (if any)."""
    from rich.text import Text

    domains = _table("domains", ("domid", "name", "page size", "memory", "pid"))
    for d in status.domains:
        domains.add_row(str(d.domid), d.name, _size(d.page_size), _size(d.memory), _opt(d.pid))
    # Domain names are unique: the domains table above gives their domids.
    devices = _table(
        "devices",
        ("device", "frontend", "backend", "state", "ring", "q", "ind", "pers", "grant"),
    )
    errors: list[str] = []
    for v in status.devices:
        label = device_label(v.cls, v.devid)
        state = f"{short_state(v.frontend_state)}/{short_state(v.backend_state)}"
        if v.error:
            state += " (!)"
            errors.append(f"{label} of {v.frontend}: {v.error}")
        devices.add_row(
            label,
            v.frontend,
            v.backend,
            state if v.connected else f"[yellow]{state}[/yellow]",
            _opt(v.ring_page_order),
            _opt(v.queues),
            _opt(v.indirect_segments),
            _opt(v.persistent),
            _size(v.grant_size),
        )
    out: list[Any] = [domains, devices, Text(DEVICES_LEGEND, style="dim")]
    out.extend(Text(f"(!) {line}", style="yellow") for line in errors)
    if status.checks:
        checks = _table("checks", ("check", "result", "detail"))
        for c in status.checks:
            ok = "[green]ok[/green]" if c.get("ok") else "[red]FAILED[/red]"
            checks.add_row(str(c.get("name")), ok, str(c.get("detail", "")))
        out.append(checks)
    return out
