"""What one link holds of grants, both ways: the peer's pins on our grants (granter side) and
our mappings of the peer's grants with their replicas (mapper side).

A domain keeps one `PeerGrants` per live link; when the link dies, the record is torn down
whole (pins dropped, mappings killed), so a new link to the same peer starts clean.
"""

from __future__ import annotations

import contextlib

from xenpv.hv.mapping import GrantMapping


class PeerGrants:
    __slots__ = ("mappings", "pins", "replicas")

    def __init__(self) -> None:
        # Granter side: the peer's pins on our grants, gref -> [read pins, write pins].
        self.pins: dict[int, list[int]] = {}
        # Mapper side: our mappings of the peer's grants, and for the socket transport the
        # replicas to update when the granter writes, gref -> [(mapping, offset in view)].
        # In mapping order (a dict as an ordered set: a set of objects iterates in address
        # order, which a simulated run could not reproduce).
        self.mappings: dict[GrantMapping, None] = {}
        self.replicas: dict[int, list[tuple[GrantMapping, int]]] = {}

    def add_mapping(self, mapping: GrantMapping, replica: bool) -> None:
        """Track a new mapping; a `replica` (socket transport) follows the granter's writes."""
        self.mappings[mapping] = None
        if replica:
            for gref, base in zip(mapping.grefs, mapping.bases, strict=True):
                self.replicas.setdefault(gref, []).append((mapping, base))

    def remove_mapping(self, mapping: GrantMapping) -> None:
        self.mappings.pop(mapping, None)
        for gref, base in zip(mapping.grefs, mapping.bases, strict=True):
            entries = self.replicas.get(gref)
            if entries is not None:
                with contextlib.suppress(ValueError):
                    entries.remove((mapping, base))
                if not entries:
                    del self.replicas[gref]

    def apply_granter_write(self, gref: int, offset: int, data: bytes) -> bool:
        """The granter changed memory under its grant `gref`: update every replica of it;
        False if every replica already held those bytes."""
        changed = False
        for mapping, base in self.replicas.get(gref, ()):
            changed = mapping.apply(base, offset, data) or changed
        return changed

    def revoke_mappings(self, grefs: set[int], reason: str) -> None:
        """The granter revoked `grefs` by force: every mapping holding one of them dies."""
        for mapping in list(self.mappings):
            if grefs.intersection(mapping.grefs):
                mapping.revoke(reason)
                self.remove_mapping(mapping)

    def kill_mappings(self, reason: str) -> None:
        """The peer is gone: every mapping of its grants dies."""
        for mapping in list(self.mappings):
            mapping.kill(reason)
        self.mappings.clear()
        self.replicas.clear()
