"""Xenstore quotas as a toolstack concern: what each domain needs for its devices.

C xenstored limits every unprivileged domain (1000 nodes, 128 watches, 10 transactions by
default). A backend domain serving many devices needs more: each device costs its drivers
watches (the frontend's `state`, the backend directory), nodes (the backend directory's keys,
owned by the backend domain) and, while handshakes publish, a transaction. Before anything
starts, `plan_quotas` compares each domain's needs with its limits:

- a limit the topology sets (`[xenstore.quota]` for all domains, `[xenstore.quota.domain.
  NAME]` for one, with C xenstored's quota names) and that is too small fails the start with
  one line naming the domain, the quota, the need and the key that raises it;
- a limit left at its default is raised for that domain only (xenstored's `--quota-domain`).

Domids are those `provision.apply_topology` gives a fresh store: file order from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from xenpv.errors import UsageError
from xenpv.toolstack.topology import Topology
from xenpv.xenstore.quotas import C_NAMES, Quotas

# What one domain's runtime costs on its own, and what each device costs each end (counted
# generously from the drivers: a 4-queue blkfront with 16-page rings writes ~90 keys).
OWN_WATCHES = 16
OWN_NODES = 64
OWN_TRANSACTIONS = 4
BACKEND_WATCHES_PER_DEVICE = 2  # the frontend's state, the backend directory
FRONTEND_WATCHES_PER_DEVICE = 4
BACKEND_NODES_PER_DEVICE = 80
FRONTEND_NODES_PER_DEVICE = 160
TRANSACTIONS_PER_DEVICE = 1  # a handshake step publishes in one transaction at a time

FIELD_TO_C = {ours: c for c, ours in C_NAMES.items()}


class QuotaError(UsageError):
    """A quota the topology sets is below what a domain needs."""


@dataclass(frozen=True, slots=True)
class DomainNeeds:
    name: str
    domid: int
    backend_devices: int
    frontend_devices: int

    def needs(self) -> dict[str, int]:
        """Our quota field -> the least this domain needs."""
        be, fe = self.backend_devices, self.frontend_devices
        return {
            "watches_per_domain": OWN_WATCHES
            + BACKEND_WATCHES_PER_DEVICE * be
            + FRONTEND_WATCHES_PER_DEVICE * fe,
            "nodes_per_domain": OWN_NODES
            + BACKEND_NODES_PER_DEVICE * be
            + FRONTEND_NODES_PER_DEVICE * fe,
            "transactions_per_domain": OWN_TRANSACTIONS + TRANSACTIONS_PER_DEVICE * (be + fe),
        }


def domain_needs(topo: Topology) -> list[DomainNeeds]:
    ends = [(d.backend, d.frontend) for d in topo.vbds] + [
        (d.backend, d.frontend) for d in topo.vifs
    ]
    out = []
    for index, spec in enumerate(topo.domains):
        be = sum(backend == spec.name for backend, _ in ends)
        fe = sum(frontend == spec.name for _, frontend in ends)
        out.append(DomainNeeds(spec.name, index + 1, be, fe))
    return out


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    """xenstored's quota arguments: global `NAME=N`, and `DOMID:NAME=N` per domain."""

    settings: tuple[str, ...]
    domain_settings: tuple[str, ...]

    def xenstored_args(self) -> list[str]:
        args: list[str] = []
        for s in self.settings:
            args += ["--quota", s]
        for s in self.domain_settings:
            args += ["--quota-domain", s]
        return args


def plan_quotas(topo: Topology, defaults: Quotas | None = None) -> QuotaPlan:
    """Size every domain's quotas for its devices, or raise QuotaError (see module doc)."""
    base = defaults if defaults is not None else Quotas()
    settings = [f"{FIELD_TO_C[f]}={v}" for f, v in topo.xenstore_quota.items()]
    domain_settings: list[str] = []
    for dom in domain_needs(topo):
        own = topo.xenstore_domain_quota.get(dom.name, {})
        for field_name, need in dom.needs().items():
            c_name = FIELD_TO_C[field_name]
            if field_name in own:
                limit, key = own[field_name], f"xenstore.quota.domain.{dom.name}.{c_name}"
            elif field_name in topo.xenstore_quota:
                limit, key = topo.xenstore_quota[field_name], f"xenstore.quota.{c_name}"
            else:
                limit, key = getattr(base, field_name), ""
            if limit >= need:
                if field_name in own:
                    domain_settings.append(f"{dom.domid}:{c_name}={limit}")
                continue
            if key:
                raise QuotaError(
                    f"domain {dom.name}: xenstore quota {c_name} is {limit} but its "
                    f"{dom.backend_devices} backend and {dom.frontend_devices} frontend "
                    f"devices need {need}; raise {key}"
                )
            domain_settings.append(f"{dom.domid}:{c_name}={need}")
    return QuotaPlan(tuple(settings), tuple(domain_settings))
