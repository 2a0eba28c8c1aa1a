"""Per-domain quotas with C xenstored's defaults (they apply to unprivileged domains only)."""

from __future__ import annotations

from dataclasses import dataclass


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


NODE_HEADER_SIZE = 24  # struct xs_tdb_record_hdr: u64 generation + 3 x u32, padded to 8
PERM_ENTRY_SIZE = 8  # struct xs_permissions: int perms + unsigned id
