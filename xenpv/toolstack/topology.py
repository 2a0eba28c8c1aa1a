"""Topology files (TOML): which domains run, with which page sizes, and which devices join them.

Validation is strict and every error names the field and the reason, e.g.
`vbd[0].frontend: no domain named 'guest9'`. The embedded `DEFAULT_TOPOLOGY` is what
`xenpv demo` runs: one backend domain and three guests with 4 KiB, 16 KiB and 64 KiB pages,
each with a vbd and a vif.

```toml
transport = "auto"            # auto | shm | socket | tcp (socket copy over TCP, any host)
start = "fork"                # fork (from a pre-imported fork server) | spawn (a new python)

[xenstore]
tcp = "127.0.0.1:0"           # optional TCP listener for domains (port 0: pick one)
[xenstore.quota]              # optional: C xenstored's quotas for every unprivileged domain
watches = 128                 # nodes, node-size, watches, transactions, permissions,
                              # transaction-nodes (left out: sized for each domain's devices)
[xenstore.quota.domain.backend]
watches = 1024                # one domain's own limit (xenpv/toolstack/quotas.py)

[[domain]]
name = "backend"
role = "backend"              # backend | guest
page_size = "4K"              # 4K | 16K | 64K (or bytes)
memory = "64M"
restart = "no"                # no | on-failure: restart its process if it dies with an error
group = "g0"                  # optional, guests only: guests of one group share a process

[[vbd]]
frontend = "guest4k"
backend = "backend"
image = "guest4k.img"         # relative paths are under the cluster's state directory
size = "64M"
read_only = false
sector_size = 512             # 512 | 4096
nbd = "unix:/tmp/g4k.sock"    # optional: the guest exports this disk over NBD (docs/nbd.md)
[vbd.features]                # all on by default; switch any off
ring_page_order = 4           # max-ring-page-order offered, 0..4
queues = 4                    # multi-queue-max-queues, 1..4
indirect_segments = 256       # feature-max-indirect-segments, 0 = off
persistent = true
flush = true
barrier = true
discard = true

[[vif]]
frontend = "guest4k"
backend = "backend"
mac = "00:16:3e:00:00:01"
tap = "xvif0"                 # optional: attach a host TAP device to the guest's netfront
```
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xenpv.errors import UsageError
from xenpv.xenbus import keys
from xenpv.xenstore.quotas import C_NAMES

Transport = Literal["auto", "shm", "socket", "tcp"]
TRANSPORTS: tuple[Transport, ...] = ("auto", "shm", "socket", "tcp")
PAGE_SIZES = (4096, 16384, 65536)
SECTOR_SIZES = (512, 4096)
RESTART_POLICIES = ("no", "on-failure")


class TopologyError(UsageError):
    """A topology file is malformed; the message names the field and the reason."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, slots=True)
class DomainSpec:
    name: str
    role: Literal["backend", "guest"]
    page_size: int
    memory: int
    restart: Literal["no", "on-failure"] = "no"  # what the launcher does when its process dies
    group: str | None = None  # guests of one group run in one process (`xenpv domain`)


@dataclass(frozen=True, slots=True)
class VbdFeatures:
    ring_page_order: int = keys.MAX_RING_PAGE_ORDER
    queues: int = keys.BLK_MAX_QUEUES
    indirect_segments: int = keys.BLK_MAX_INDIRECT_SEGMENTS
    persistent: bool = True
    flush: bool = True
    barrier: bool = True
    discard: bool = True
    # the largest grant granule order the backend accepts (docs/granule-extension.md)
    max_granule_order: int = 4


@dataclass(frozen=True, slots=True)
class VbdSpec:
    frontend: str
    backend: str
    image: str | None  # None: an in-memory disk
    size: int
    read_only: bool = False
    sector_size: int = 512
    features: VbdFeatures = field(default_factory=VbdFeatures)
    nbd: str | None = None  # "unix:PATH" | "tcp:HOST:PORT": the guest serves the disk there


@dataclass(frozen=True, slots=True)
class VifSpec:
    frontend: str
    backend: str
    mac: str
    tap: str | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    domains: tuple[DomainSpec, ...]
    vbds: tuple[VbdSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    transport: Transport = "auto"
    xenstore_tcp: str | None = None
    # quota field -> limit, for every domain / for the named domain (toolstack/quotas.py)
    xenstore_quota: Mapping[str, int] = field(default_factory=dict)
    xenstore_domain_quota: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    start: Literal["fork", "spawn"] = "fork"  # how domain processes start (toolstack/forkserver)

    def domain(self, name: str) -> DomainSpec:
        for spec in self.domains:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def guests(self) -> tuple[DomainSpec, ...]:
        return tuple(d for d in self.domains if d.role == "guest")

    @property
    def backends(self) -> tuple[DomainSpec, ...]:
        return tuple(d for d in self.domains if d.role == "backend")


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
_NBD_RE = re.compile(r"^(unix:.+|tcp:.+:\d{1,5})$")


def parse_size(value: object, where: str) -> int:
    """`4096`, `"4K"`, `"64M"`, `"1GiB"` → bytes."""
    if isinstance(value, bool):
        raise TopologyError(where, "expected a size like 4096, '16K' or '64M'")
    if isinstance(value, int):
        if value <= 0:
            raise TopologyError(where, "must be positive")
        return value
    if isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(m.group(1)) * _UNITS[m.group(2).upper()]
        if size <= 0:
            raise TopologyError(where, "must be positive")
        return size
    raise TopologyError(where, f"expected a size like 4096, '16K' or '64M', got {value!r}")


class TomlTable:
    """One TOML table read key by key, each key marked used; `done` reports the first key
    never read. Errors are `error` (a topology's; a fault plan's table raises its own) and
    name the key by its dotted path."""

    error: type[TopologyError] = TopologyError

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, Mapping):
            raise self.error(where, "expected a table")
        self.raw: Mapping[str, Any] = raw
        self.where = where
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, default: object = None, *, required: bool = False) -> object:
        self.used.add(key)
        if key not in self.raw:
            if required:
                raise self.error(self.at(key), "missing")
            return default
        return self.raw[key]

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise self.error(self.at(unknown[0]), "unknown key")


class _Table(TomlTable):
    """A topology table's typed reads (`_REQUIRED` as the default: the key must be there)."""

    def _get(self, key: str, default: object) -> object:
        return self.get(key, default, required=default is _REQUIRED)

    def string(self, key: str, default: object = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise TopologyError(self.at(key), f"expected a string, got {value!r}")
        return value

    def opt_string(self, key: str) -> str | None:
        value = self._get(key, None)
        if value is None:
            return None
        if not isinstance(value, str):
            raise TopologyError(self.at(key), f"expected a string, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise TopologyError(self.at(key), f"expected true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TopologyError(self.at(key), f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise TopologyError(self.at(key), f"must be between {lo} and {hi}, got {value}")
        return value

    def size(self, key: str, default: object = None) -> int:
        return parse_size(self._get(key, default), self.at(key))

    def choice(self, key: str, default: object, choices: tuple[object, ...]) -> Any:
        value = self._get(key, default)
        if value not in choices:
            listed = ", ".join(repr(c) for c in choices)
            raise TopologyError(self.at(key), f"must be one of {listed}, got {value!r}")
        return value


_REQUIRED = object()


def _list(raw: Mapping[str, Any], key: str) -> list[object]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise TopologyError(key, "expected an array of tables ([[" + key + "]])")
    return value


def _domain(raw: object, where: str) -> DomainSpec:
    t = _Table(raw, where)
    name = t.string("name", _REQUIRED)
    if not _NAME_RE.match(name):
        raise TopologyError(t.at("name"), "use letters, digits, '-' and '_' (at most 64)")
    role = t.choice("role", "guest", ("backend", "guest"))
    page_size = t.size("page_size", 4096)
    if page_size not in PAGE_SIZES:
        raise TopologyError(t.at("page_size"), f"must be 4K, 16K or 64K, got {page_size}")
    memory = t.size("memory", "64M")
    if memory % page_size:
        raise TopologyError(t.at("memory"), f"must be a multiple of the page size {page_size}")
    restart = t.choice("restart", "no", RESTART_POLICIES)
    group = t.opt_string("group")
    if group is not None:
        if not _NAME_RE.match(group):
            raise TopologyError(t.at("group"), "use letters, digits, '-' and '_' (at most 64)")
        if role != "guest":
            raise TopologyError(t.at("group"), "only guests share a process")
        if restart != "no":
            raise TopologyError(t.at("restart"), "a grouped guest's process is not restarted")
    t.done()
    return DomainSpec(name, role, page_size, memory, restart, group)


def _vbd_features(raw: object, where: str) -> VbdFeatures:
    t = _Table(raw, where)
    d = VbdFeatures()
    features = VbdFeatures(
        ring_page_order=t.integer(
            "ring_page_order", d.ring_page_order, 0, keys.MAX_RING_PAGE_ORDER
        ),
        queues=t.integer("queues", d.queues, 1, keys.BLK_MAX_QUEUES),
        indirect_segments=t.integer("indirect_segments", d.indirect_segments, 0, 512),
        persistent=t.flag("persistent", d.persistent),
        flush=t.flag("flush", d.flush),
        barrier=t.flag("barrier", d.barrier),
        discard=t.flag("discard", d.discard),
    )
    t.done()
    return features


def _ends(t: _Table, domains: Mapping[str, DomainSpec]) -> tuple[str, str]:
    frontend = t.string("frontend", _REQUIRED)
    backend = t.string("backend", _REQUIRED)
    for key, name, role in (("frontend", frontend, "guest"), ("backend", backend, "backend")):
        if name not in domains:
            raise TopologyError(t.at(key), f"no domain named {name!r}")
        if domains[name].role != role:
            raise TopologyError(t.at(key), f"domain {name!r} has role {domains[name].role!r}")
    return frontend, backend


def _vbd(raw: object, where: str, domains: Mapping[str, DomainSpec]) -> VbdSpec:
    t = _Table(raw, where)
    frontend, backend = _ends(t, domains)
    sector_size = t.choice("sector_size", 512, SECTOR_SIZES)
    size = t.size("size", "64M")
    if size % sector_size:
        raise TopologyError(t.at("size"), f"must be a multiple of sector_size {sector_size}")
    features = _vbd_features(t._get("features", {}), t.at("features"))
    nbd = t.opt_string("nbd")
    if nbd is not None and not _NBD_RE.match(nbd):
        raise TopologyError(t.at("nbd"), f"expected 'unix:PATH' or 'tcp:HOST:PORT', got {nbd!r}")
    spec = VbdSpec(
        frontend=frontend,
        backend=backend,
        image=t.opt_string("image"),
        size=size,
        read_only=t.flag("read_only", False),
        sector_size=sector_size,
        features=features,
        nbd=nbd,
    )
    t.done()
    return spec


def _vif(raw: object, where: str, domains: Mapping[str, DomainSpec], index: int) -> VifSpec:
    t = _Table(raw, where)
    frontend, backend = _ends(t, domains)
    mac = t.string("mac", f"00:16:3e:00:00:{index + 1:02x}").lower()
    if not _MAC_RE.match(mac):
        raise TopologyError(t.at("mac"), f"expected a MAC like 00:16:3e:00:00:01, got {mac!r}")
    if int(mac[:2], 16) & 1:
        raise TopologyError(t.at("mac"), "must be a unicast address (low bit of the first byte 0)")
    tap = t.opt_string("tap")
    if tap is not None and not _TAP_RE.match(tap):
        raise TopologyError(t.at("tap"), "interface names are 1-15 of [A-Za-z0-9_.-]")
    t.done()
    return VifSpec(frontend, backend, mac, tap)


def parse(raw: Mapping[str, Any]) -> Topology:
    """Validate a decoded TOML document."""
    top = _Table(raw, "topology")
    transport = top.choice("transport", "auto", TRANSPORTS)
    start = top.choice("start", "fork", ("fork", "spawn"))
    xs = _Table(top._get("xenstore", {}), "xenstore")
    xenstore_tcp = xs.opt_string("tcp")
    quota, domain_quota = _quotas(xs._get("quota", {}))
    xs.done()
    domains_raw = _list(raw, "domain")
    top.used.add("domain")
    if not domains_raw:
        raise TopologyError("domain", "at least one [[domain]] is required")
    domains: dict[str, DomainSpec] = {}
    for i, item in enumerate(domains_raw):
        spec = _domain(item, f"domain[{i}]")
        if spec.name in domains:
            raise TopologyError(f"domain[{i}].name", f"duplicate domain name {spec.name!r}")
        domains[spec.name] = spec
    vbds = tuple(_vbd(item, f"vbd[{i}]", domains) for i, item in enumerate(_list(raw, "vbd")))
    vifs = tuple(_vif(item, f"vif[{i}]", domains, i) for i, item in enumerate(_list(raw, "vif")))
    top.used.update(("vbd", "vif"))
    macs = [v.mac for v in vifs]
    for i, mac in enumerate(macs):
        if mac in macs[:i]:
            raise TopologyError(f"vif[{i}].mac", f"duplicate MAC {mac}")
    top.done()
    for name in domain_quota:
        if name not in domains:
            raise TopologyError(f"xenstore.quota.domain.{name}", f"no domain named {name!r}")
    return Topology(
        tuple(domains.values()), vbds, vifs, transport, xenstore_tcp, quota, domain_quota, start
    )


def _quotas(raw: object) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    if not isinstance(raw, Mapping):
        raise TopologyError("xenstore.quota", "expected a table")
    raw = dict(raw)
    per_domain = raw.pop("domain", {})
    if not isinstance(per_domain, Mapping):
        raise TopologyError("xenstore.quota.domain", "expected a table of domain names")
    domain_quota = {}
    for name, table in per_domain.items():
        where = f"xenstore.quota.domain.{name}"
        if not isinstance(table, Mapping):
            raise TopologyError(where, "expected a table")
        domain_quota[name] = parse_quota_table(table, where)
    return parse_quota_table(raw, "xenstore.quota"), domain_quota


def parse_quota_table(raw: Mapping[str, object], where: str) -> dict[str, int]:
    """`{C xenstored quota name: N}` -> {our `Quotas` field: N}."""
    out: dict[str, int] = {}
    for name, value in raw.items():
        if name not in C_NAMES:
            raise TopologyError(f"{where}.{name}", f"unknown quota (known: {', '.join(C_NAMES)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TopologyError(f"{where}.{name}", f"expected a positive integer, got {value!r}")
        out[C_NAMES[name]] = value
    return out


def loads(text: str, source: str = "<topology>") -> Topology:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(source, f"not valid TOML: {exc}") from None
    return parse(raw)


def load(path: Path) -> Topology:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(str(path), f"cannot read: {exc.strerror}") from None
    return loads(text, str(path))


# The demo's topology; `xenpv topology example` writes it out, so every setting is explained.
DEFAULT_TOPOLOGY_TOML = """\
# A xenpv topology: the demo's (`xenpv demo`), with every setting spelled out.
# Run it with:   xenpv cluster up THIS_FILE [--detach]
# Check it with: xenpv topology check THIS_FILE
# One backend domain and three guests with 4 KiB, 16 KiB and 64 KiB pages, each with a
# vbd (a sparse image file) and a vif on the backend's switch.

# How domains share memory and notify each other:
# auto | shm (shared memory) | socket (copies over a Unix socket) | tcp (copies over TCP)
transport = "auto"

# The TCP listener xenstored opens for the domains (default: 127.0.0.1, a free port):
# [xenstore]
# tcp = "127.0.0.1:0"

# -- domains ---------------------------------------------------------------------------
# name: letters, digits, '-' and '_'; role: backend | guest (default guest);
# page_size: 4K | 16K | 64K (default 4K); memory: a multiple of the page size (default 64M;
# a 64 KiB-page guest spends one page per netfront receive slot: 256 slots = 16 MiB).

[[domain]]
name = "backend"
role = "backend"
page_size = "4K"
memory = "64M"

[[domain]]
name = "guest4k"
role = "guest"
page_size = "4K"
memory = "64M"

[[domain]]
name = "guest16k"
role = "guest"
page_size = "16K"
memory = "64M"

[[domain]]
name = "guest64k"
role = "guest"
page_size = "64K"
memory = "64M"

# -- block devices (blkif) ---------------------------------------------------------------
# image: relative to the state directory, created sparse if missing (omit it for a disk
# in memory); read_only = true needs an existing image. sector_size: 512 | 4096.
# [vbd.features] is what the backend offers; the frontend picks within it.

[[vbd]]
frontend = "guest4k"
backend = "backend"
image = "guest4k.img"
size = "16M"
read_only = false
sector_size = 512
[vbd.features]
ring_page_order = 4           # largest ring the backend accepts: 2^order pages, 0..4
queues = 4                    # multi-queue-max-queues, 1..4
indirect_segments = 256       # feature-max-indirect-segments, 0 = off
persistent = true             # persistent grants
flush = true                  # flush-cache
barrier = true                # write barriers
discard = true                # trim

[[vbd]]
frontend = "guest16k"
backend = "backend"
image = "guest16k.img"
size = "16M"

[[vbd]]
frontend = "guest64k"
backend = "backend"
image = "guest64k.img"
size = "16M"

# -- network devices (netif) -------------------------------------------------------------
# mac: unicast (default 00:16:3e:00:00:<n>); tap = "NAME" also attaches a host TAP device
# to the guest's netfront (root; see docs/net.md).

[[vif]]
frontend = "guest4k"
backend = "backend"
mac = "00:16:3e:00:00:01"

[[vif]]
frontend = "guest16k"
backend = "backend"
mac = "00:16:3e:00:00:02"

[[vif]]
frontend = "guest64k"
backend = "backend"
mac = "00:16:3e:00:00:03"
"""


def default_topology() -> Topology:
    return loads(DEFAULT_TOPOLOGY_TOML, "<default topology>")
