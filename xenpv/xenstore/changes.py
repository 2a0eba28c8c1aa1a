"""Durable mutation records: what the server journals before it acknowledges a request.

One `Change` is the whole durable effect of one acknowledged request (a WRITE that creates
three ancestors, a committed transaction, an INTRODUCE...), so journaling it as one record
keeps every request atomic across a crash. Each change carries resulting states, not
requests: replaying it never re-checks permissions or quotas and never fires watches, and it
reproduces node generations exactly.

Operations (plain lists, msgpack-able):

    ["c", path, value, perms, gen]   create node (appended to its parent's children)
    ["u", path, value, perms, gen]   replace value, permissions and generation of a node
    ["g", path, gen]                 new generation only (its child list changed)
    ["d", path]                      delete node and its subtree (removed from its parent)
    ["i", domid, gfn, port]          domain introduced
    ["r", domid]                     domain released
    ["t", domid, target]             SET_TARGET
    ["s", special_path, perms]       permissions of @introduceDomain / @releaseDomain

`perms` is a list of strings such as `["w0", "r5"]`; `value` is bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xenpv.errors import XenpvError

_ARITY = {"c": 5, "u": 5, "g": 3, "d": 2, "i": 4, "r": 2, "t": 3, "s": 3}


class ChangeFormatError(XenpvError):
    """A journal record or snapshot does not have the expected shape."""


@dataclass(slots=True)
class Change:
    """The durable effect of one request: `ops` in order, then the generation counter."""

    ops: list[list[Any]] = field(default_factory=list)
    generation: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"g": self.generation, "o": self.ops}

    @classmethod
    def from_wire(cls, obj: object) -> Change:
        if not isinstance(obj, dict) or set(obj) != {"g", "o"}:
            raise ChangeFormatError("change record is not a {g, o} map")
        gen, ops = obj["g"], obj["o"]
        if not isinstance(gen, int) or not isinstance(ops, list):
            raise ChangeFormatError("change record has bad field types")
        checked: list[list[Any]] = []
        for op in ops:
            if not isinstance(op, list | tuple) or not op or _ARITY.get(op[0]) != len(op):
                raise ChangeFormatError(f"bad change operation {op!r:.80}")
            checked.append(list(op))
        return cls(checked, gen)
