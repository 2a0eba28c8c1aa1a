"""Target selectors and the concrete targets a topology offers.

Selectors (in a plan's `target` and a workload's `targets`):

- `domain:NAME`, `any-guest`, `any-backend`, `any-domain`;
- `device:GUEST:vbd:xvda`, `device:GUEST:vif:0`, `any-vbd`, `any-vif`, `any-device`;
- `queue:GUEST:vbd:xvda:N` (N below the vbd's queue count), `queue:GUEST:vif:0:N`;
- `link:A-B` (the link between domains A and B; for one-way faults, from A to B), `any-link`
  (a link between a device's frontend and its backend);
- `xenstored`.

A concrete target is a canonical selector string without `any-`, e.g. `device:guest4k:vbd:xvda`.
vbd names follow the toolstack: xvda, xvdb, ... per guest in topology order (virtual-device
202*256 + 16*i), vifs 0, 1, ... per guest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from xenpv.faults.catalogue import TargetKind
from xenpv.faults.records import JsonRecord, by_id
from xenpv.toolstack.topology import Topology

XVD_MAJOR = 202
VIF_QUEUES = 4  # the netback offers up to 4 queues (multi-queue-max-queues)

_ANY: dict[str, TargetKind] = {
    "any-guest": TargetKind.DOMAIN,
    "any-backend": TargetKind.DOMAIN,
    "any-domain": TargetKind.DOMAIN,
    "any-vbd": TargetKind.DEVICE,
    "any-vif": TargetKind.DEVICE,
    "any-device": TargetKind.DEVICE,
    "any-link": TargetKind.LINK,
    "xenstored": TargetKind.XENSTORED,
}
_DEVICE_RE = re.compile(r"^device:([^:]+):(vbd|vif):([^:]+)$")
_QUEUE_RE = re.compile(r"^queue:([^:]+):(vbd|vif):([^:]+):(\d+)$")


class SelectorError(ValueError):
    """A selector is malformed or names nothing in the topology (the message says which)."""


def selector_kind(selector: str) -> TargetKind:
    """The target kind a selector names; SelectorError if its syntax is wrong."""
    if selector in _ANY:
        return _ANY[selector]
    if selector.startswith("domain:") and len(selector) > len("domain:"):
        return TargetKind.DOMAIN
    if _DEVICE_RE.match(selector):
        return TargetKind.DEVICE
    if _QUEUE_RE.match(selector):
        return TargetKind.QUEUE
    if selector.startswith("link:") and "-" in selector[5:]:
        return TargetKind.LINK
    raise SelectorError(
        f"unknown selector {selector!r} (domain:NAME, device:GUEST:vbd:xvda, "
        "queue:GUEST:vbd:xvda:0, link:A-B, xenstored, any-guest, any-vbd, any-link, ...)"
    )


def vbd_name(index: int) -> str:
    """xvda, xvdb, ..., xvdz, xvdaa: the toolstack's per-guest vbd names."""
    letters = ""
    n = index
    while True:
        letters = chr(ord("a") + n % 26) + letters
        n = n // 26 - 1
        if n < 0:
            return "xvd" + letters


def vbd_devid(index: int) -> int:
    return XVD_MAJOR * 256 + 16 * index


@dataclass(frozen=True, slots=True)
class DeviceTarget(JsonRecord):
    id: str  # device:GUEST:vbd:xvda
    cls: str  # vbd | vif
    guest: str
    backend: str
    name: str  # xvda | 0
    devid: int  # 51712 | 0
    queues: int

    @property
    def key(self) -> str:
        """The prefix of this device's history keys, e.g. `vbd:guest4k:51712`."""
        return f"{self.cls}:{self.guest}:{self.devid}"


@dataclass(frozen=True, slots=True)
class Targets:
    """Everything in a topology a fault can be aimed at."""

    roles: dict[str, str]  # domain name -> backend | guest
    devices: tuple[DeviceTarget, ...]
    links: tuple[str, ...] = field(default=())  # link:A-B, A < B

    @classmethod
    def of(cls, topology: Topology) -> Targets:
        devices: list[DeviceTarget] = []
        per_guest: dict[tuple[str, str], int] = {}
        for vbd in topology.vbds:
            i = per_guest.get((vbd.frontend, "vbd"), 0)
            per_guest[(vbd.frontend, "vbd")] = i + 1
            name = vbd_name(i)
            devices.append(
                DeviceTarget(
                    f"device:{vbd.frontend}:vbd:{name}",
                    "vbd",
                    vbd.frontend,
                    vbd.backend,
                    name,
                    vbd_devid(i),
                    vbd.features.queues,
                )
            )
        for vif in topology.vifs:
            i = per_guest.get((vif.frontend, "vif"), 0)
            per_guest[(vif.frontend, "vif")] = i + 1
            devices.append(
                DeviceTarget(
                    f"device:{vif.frontend}:vif:{i}",
                    "vif",
                    vif.frontend,
                    vif.backend,
                    str(i),
                    i,
                    VIF_QUEUES,
                )
            )
        links = sorted({link_id(d.guest, d.backend) for d in devices})
        roles: dict[str, str] = {d.name: d.role for d in topology.domains}
        return cls(roles, tuple(devices), tuple(links))

    def device(self, device_id: str) -> DeviceTarget:
        return by_id(self.devices, device_id)

    def to_json(self) -> dict[str, object]:
        return {
            "domains": dict(sorted(self.roles.items())),
            "devices": [d.to_json() for d in self.devices],
            "links": list(self.links),
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Targets:
        domains = raw["domains"]
        devices = raw["devices"]
        links = raw["links"]
        assert isinstance(domains, dict) and isinstance(devices, list)
        assert isinstance(links, list)
        return cls(
            {str(k): str(v) for k, v in domains.items()},
            tuple(DeviceTarget.from_json(d) for d in devices),
            tuple(str(x) for x in links),
        )

    # -- resolving selectors ----------------------------------------------------------------

    def candidates(self, selector: str) -> list[str]:
        """The concrete targets a selector may mean (one, unless it is an `any-`)."""
        kind = selector_kind(selector)
        if selector == "xenstored":
            return ["xenstored"]
        if kind is TargetKind.DOMAIN:
            if selector.startswith("domain:"):
                name = selector[len("domain:") :]
                if name not in self.roles:
                    raise SelectorError(f"no domain named {name!r}")
                return [selector]
            role = {"any-guest": "guest", "any-backend": "backend"}.get(selector)
            found = [f"domain:{n}" for n, r in self.roles.items() if role in (None, r)]
            if not found:
                raise SelectorError(f"{selector}: the topology has no such domain")
            return found
        if kind is TargetKind.DEVICE:
            if selector.startswith("device:"):
                self._device_named(selector)
                return [selector]
            want = {"any-vbd": "vbd", "any-vif": "vif"}.get(selector)
            found = [d.id for d in self.devices if want in (None, d.cls)]
            if not found:
                raise SelectorError(f"{selector}: the topology has no such device")
            return found
        if kind is TargetKind.QUEUE:
            m = _QUEUE_RE.match(selector)
            assert m is not None
            device = self._device_named(f"device:{m.group(1)}:{m.group(2)}:{m.group(3)}")
            if int(m.group(4)) >= device.queues:
                raise SelectorError(
                    f"{device.id} has {device.queues} queue(s), no queue {m.group(4)}"
                )
            return [selector]
        # links
        if selector == "any-link":
            if not self.links:
                raise SelectorError("any-link: the topology has no devices, hence no links")
            return list(self.links)
        return [self._link_named(selector[len("link:") :])]

    def _device_named(self, device_id: str) -> DeviceTarget:
        m = _DEVICE_RE.match(device_id)
        assert m is not None
        guest = m.group(1)
        if guest not in self.roles:
            raise SelectorError(f"no domain named {guest!r}")
        try:
            return self.device(device_id)
        except KeyError:
            have = ", ".join(d.id for d in self.devices if d.guest == guest) or "none"
            raise SelectorError(f"no device {device_id!r} (that guest has: {have})") from None

    def _link_named(self, text: str) -> str:
        """`A-B` where names may themselves contain '-': the split whose halves are domains."""
        for i, ch in enumerate(text):
            if ch == "-" and text[:i] in self.roles and text[i + 1 :] in self.roles:
                a, b = text[:i], text[i + 1 :]
                if a == b:
                    raise SelectorError(f"link:{text}: a link joins two different domains")
                return f"link:{a}-{b}"
        raise SelectorError(f"link:{text}: no two domains named like that")

    # -- what a target touches (for the checkers) -------------------------------------------

    def link_ends(self, target: str) -> tuple[str, str]:
        text = target[len("link:") :]
        for i, ch in enumerate(text):
            if ch == "-" and text[:i] in self.roles and text[i + 1 :] in self.roles:
                return text[:i], text[i + 1 :]
        raise KeyError(target)

    def touches_guest(self, target: str, guest: str) -> bool:
        """Whether a fault on `target` may disturb the devices of `guest`: its own domain,
        devices and links, the backends serving it, and xenstored."""
        if target == "xenstored":
            return True
        backends = {d.backend for d in self.devices if d.guest == guest}
        if target.startswith("domain:"):
            name = target[len("domain:") :]
            return name == guest or name in backends
        if target.startswith(("device:", "queue:")):
            return target.split(":")[1] == guest
        if target.startswith("link:"):
            try:
                a, b = self.link_ends(target)
            except KeyError:
                return True
            return guest in (a, b)
        return True

    def touches_device(self, target: str, device: DeviceTarget) -> bool:
        if target.startswith(("device:", "queue:")):
            return target == device.id or target.startswith(device.id + ":")
        return self.touches_guest(target, device.guest)


def link_id(a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"link:{first}-{second}"
