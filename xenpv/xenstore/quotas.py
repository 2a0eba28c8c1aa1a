"""Quotas with C xenstored's defaults (they apply to unprivileged domains only).

Global values are what C's `xenstore-control quota set <name> <value>` changes (and its
command-line `-Q name=value`); `C_NAMES` maps C's names to ours. Per-domain overrides
(`Quotas.domains`) are this emulator's: C shows a domain's usage (`xenstore-control quota
<domid>`) but only sets global limits; the toolstack uses them to size a backend domain that
serves many devices without raising every guest's limits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace


@dataclass(slots=True)
class Quotas:
    """Limits, each enforced with the errno C xenstored uses.

    `node_size` counts like C's `write_node_raw`: a 24-byte record header, 8 bytes per
    permission entry, the value and the NUL-separated child names; a node larger than the
    limit is refused (ENOSPC), including a parent whose child list would grow past it.
    C compares some limits with `>` where `>=` is meant (it lets an 11th transaction and a
    129th watch through); we enforce the documented numbers exactly.
    """

    nodes_per_domain: int = 1000  # ENOSPC
    node_size: int = 2048  # ENOSPC
    watches_per_domain: int = 128  # E2BIG
    transactions_per_domain: int = 10  # ENOSPC
    perms_per_node: int = 5  # ENOSPC
    transaction_nodes: int = 1024  # ENOSPC: nodes touched by one transaction
    # domid -> its limits, replacing the global ones for that domain
    domains: dict[int, Quotas] = field(default_factory=dict)

    def of(self, domid: int) -> Quotas:
        """The limits that apply to `domid`."""
        return self.domains.get(domid, self)

    def with_values(self, values: dict[str, int]) -> Quotas:
        """A copy with some limits changed (our field names), without per-domain overrides."""
        return replace(self, domains={}, **values)


QUOTA_FIELDS = tuple(f.name for f in fields(Quotas) if f.name != "domains")

# C xenstored's quota names (xenstore-control quota, xenstored -Q) -> Quotas fields
C_NAMES: dict[str, str] = {
    "nodes": "nodes_per_domain",
    "node-size": "node_size",
    "watches": "watches_per_domain",
    "transactions": "transactions_per_domain",
    "permissions": "perms_per_node",
    "transaction-nodes": "transaction_nodes",
}

NODE_HEADER_SIZE = 24  # struct xs_tdb_record_hdr: u64 generation + 3 x u32, padded to 8
PERM_ENTRY_SIZE = 8  # struct xs_permissions: int perms + unsigned id


def parse_quota_setting(text: str) -> tuple[str, int]:
    """`NAME=N` with C xenstored's quota name -> (our field, N); ValueError with one line."""
    name, sep, value = text.partition("=")
    if not sep or name not in C_NAMES:
        raise ValueError(f"expected NAME=N with NAME one of {', '.join(C_NAMES)}, got {text!r}")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"quota {name}: expected a positive integer, got {value!r}")
    return C_NAMES[name], int(value)


def parse_domain_quota(text: str) -> tuple[int, str, int]:
    """`DOMID:NAME=N` -> (domid, our field, N); ValueError with one line."""
    domid, sep, setting = text.partition(":")
    if not sep or not domid.isdigit():
        raise ValueError(f"expected DOMID:NAME=N, got {text!r}")
    name, value = parse_quota_setting(setting)
    return int(domid), name, value


def build_quotas(base: Quotas, settings: list[str], domain_settings: list[str]) -> Quotas:
    """`base` with global `NAME=N` settings, then `DOMID:NAME=N` overrides on top of them."""
    globals_ = dict(parse_quota_setting(s) for s in settings)
    quotas = base.with_values(globals_)
    per_domain: dict[int, dict[str, int]] = {}
    for text in domain_settings:
        domid, name, value = parse_domain_quota(text)
        per_domain.setdefault(domid, {})[name] = value
    quotas.domains = {d: quotas.with_values(v) for d, v in per_domain.items()}
    return quotas
