"""The fault catalogue: every kind of fault a plan can name, as data.

A kind is named `family.name` (`link.partition`, `storage.eio`): several families have a
`delay` or a `duplicate`, and the family says which seam injects it. Each kind lists its
parameters (type, default, allowed range or choices) and the target kinds it may be aimed at;
`xenpv.faults.plan` validates a plan against this table and `docs/faults.md` carries it as a
table (a test keeps the two equal). Three flags tell the checkers what a fault may excuse:
`may_lose` (a gap in a flow, an unanswered request), `may_duplicate` (a frame seen twice) and
`loses_cache` (writes acknowledged but not covered by a completed flush may vanish).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

Scalar = bool | int | float | str


class Family(enum.Enum):
    EVENT = "event"
    GRANT = "grant"
    RING = "ring"
    XENSTORE = "xenstore"
    PROCESS = "process"
    LINK = "link"
    STORAGE = "storage"
    DEVICE = "device"


class TargetKind(enum.Enum):
    """What a fault is aimed at (see `xenpv.faults.plan` for the selector syntax)."""

    DOMAIN = "domain"  # domain:NAME
    DEVICE = "device"  # device:GUEST:vbd:xvda, device:GUEST:vif:0
    QUEUE = "queue"  # queue:GUEST:vbd:xvda:0
    LINK = "link"  # link:A-B
    XENSTORED = "xenstored"  # xenstored


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a fault kind. `lo`/`hi` bound numbers; `choices` lists strings."""

    name: str
    type: type[Scalar]
    default: Scalar
    description: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def describe_range(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.type is bool:
            return "true|false"
        if self.lo is not None or self.hi is not None:
            lo = "" if self.lo is None else f"{self.lo:g}"
            hi = "" if self.hi is None else f"{self.hi:g}"
            return f"{lo}..{hi}"
        return "any"


@dataclass(frozen=True, slots=True)
class FaultKind:
    family: Family
    name: str
    description: str
    params: tuple[Param, ...]
    targets: tuple[TargetKind, ...]
    may_lose: bool = False
    may_duplicate: bool = False
    loses_cache: bool = False

    @property
    def injector(self) -> str | None:
        """The module whose injector applies this kind; None: catalogued, but its seam (in
        the hypervisor, a driver, xenstored or the process supervisor) is not wired yet."""
        return _INJECTORS.get(self.id, _INJECTORS.get(self.family.value))

    @property
    def why_not(self) -> str | None:
        """Why a fault run cannot inject this kind yet (None: it can)."""
        return NOT_YET.get(self.id, NOT_YET.get(self.family.value))

    @property
    def id(self) -> str:
        return f"{self.family.value}.{self.name}"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


_INJECTORS = {
    "link": "xenpv.faults.link",
    "storage": "xenpv.faults.storage",
    "process": "xenpv.faults.process",
    "event": "xenpv.faults.agent",
    "ring": "xenpv.faults.hostile",
    "grant.map-fail": "xenpv.faults.agent",
    "grant.batch-element-fail": "xenpv.faults.agent",
    "grant.revoke-while-mapped": "xenpv.faults.agent",
    "xenstore.commit-eagain": "xenpv.faults.xsagent",
    "xenstore.conn-reset": "xenpv.faults.xsagent",
    "xenstore.watch-delay": "xenpv.faults.xsagent",
    "xenstore.watch-duplicate": "xenpv.faults.xsagent",
    "xenstore.watch-drop": "xenpv.faults.xsagent",
    "xenstore.watch-flood": "xenpv.faults.xsagent",
    "xenstore.xenstored-kill": "xenpv.faults.process",
    "device.detach-reattach": "xenpv.faults.device",
}
# Kinds with no injector in a fault run yet, and why (`xenpv faults list` says it).
NOT_YET: dict[str, str] = {}

D, V, Q, L, X = (
    TargetKind.DOMAIN,
    TargetKind.DEVICE,
    TargetKind.QUEUE,
    TargetKind.LINK,
    TargetKind.XENSTORED,
)

# GNTST_* status names a grant operation may be failed with (xen/include/public/grant_table.h).
GNTST_NAMES = (
    "GNTST_general_error",
    "GNTST_bad_domain",
    "GNTST_bad_gntref",
    "GNTST_bad_handle",
    "GNTST_bad_virt_addr",
    "GNTST_bad_dev_addr",
    "GNTST_no_device_space",
    "GNTST_permission_denied",
    "GNTST_bad_page",
    "GNTST_bad_copy_arg",
    "GNTST_address_too_big",
    "GNTST_eagain",
)


def _seconds(name: str, default: float, description: str, hi: float = 60.0) -> Param:
    return Param(name, float, default, description, 0.0, hi)


_SIGNALS = ("SIGKILL", "SIGTERM")

KINDS: tuple[FaultKind, ...] = (
    # -- event channels ------------------------------------------------------------------
    FaultKind(
        Family.EVENT,
        "delay",
        "hold event notifications on a port for a while before delivering them",
        (_seconds("delay", 0.01, "seconds each notification is held", 5.0),),
        (D, V, Q),
    ),
    FaultKind(
        Family.EVENT,
        "drop",
        "lose event notifications (the peer must recover by re-checking the ring)",
        (),
        (D, V, Q),
        may_lose=True,
    ),
    FaultKind(
        Family.EVENT,
        "duplicate",
        "deliver each event notification twice",
        (),
        (D, V, Q),
        may_duplicate=True,
    ),
    FaultKind(
        Family.EVENT,
        "spurious",
        "send notifications with no work behind them",
        (Param("rate", float, 100.0, "spurious notifications per second", 0.0, 1e5),),
        (D, V, Q),
    ),
    FaultKind(
        Family.EVENT,
        "storm",
        "a hostile peer floods a port with notifications (XSA-332/391)",
        (Param("rate", float, 10000.0, "notifications per second", 1.0, 1e6),),
        (D, V, Q),
    ),
    # -- grants --------------------------------------------------------------------------
    FaultKind(
        Family.GRANT,
        "map-fail",
        "fail grant map operations with a GNTST status (eagain must be retried)",
        (
            Param("status", str, "GNTST_eagain", "status returned", choices=GNTST_NAMES),
            Param("one_in", int, 1, "fail one operation in every N", 1, 1e6),
        ),
        (D, V, Q),
        may_lose=True,  # a frame whose grant copy fails is dropped, as netback does
    ),
    FaultKind(
        Family.GRANT,
        "batch-element-fail",
        "fail element k of a grant batch, the rest succeed (XSA-361/362)",
        (
            Param("k", int, 0, "index of the failing element", 0, 4096),
            Param("status", str, "GNTST_general_error", "status", choices=GNTST_NAMES),
        ),
        (D, V, Q),
        may_lose=True,
    ),
    FaultKind(
        Family.GRANT,
        "revoke-while-mapped",
        "a hostile granter ends its mapped data grants by force (Xen refuses: end_access"
        " fails while mapped); the mapper's next access faults; granted again at the stop",
        (),
        (D, V),
    ),
    # -- rings ---------------------------------------------------------------------------
    FaultKind(
        Family.RING,
        "prod-corrupt",
        "write a producer index that runs past the ring (a hostile peer)",
        (Param("offset", int, 1000, "how far past the consumer", 1, 1 << 31),),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "cons-corrupt",
        "write a consumer index that runs past the producer",
        (Param("offset", int, 1000, "how far past the producer", 1, 1 << 31),),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "bad-id",
        "answer with a response id that no request carried",
        (),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "duplicate-id",
        "answer one request twice",
        (),
        (V, Q),
        may_duplicate=True,
    ),
    FaultKind(
        Family.RING,
        "stale-id",
        "answer with the id of a request already completed",
        (),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "segment-out-of-range",
        "a request whose segment runs past its page (first/last sector)",
        (),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "sector-out-of-range",
        "a request that runs past the end of the disk",
        (),
        (V, Q),
    ),
    FaultKind(
        Family.RING,
        "double-fetch",
        "change a request on the shared ring after the backend first read it (XSA-155)",
        (),
        (V, Q),
    ),
    # -- xenstore ------------------------------------------------------------------------
    FaultKind(
        Family.XENSTORE,
        "watch-delay",
        "hold watch events for a while before delivering them",
        (_seconds("delay", 0.05, "seconds each watch event is held", 10.0),),
        (D, X),
    ),
    FaultKind(
        Family.XENSTORE,
        "watch-duplicate",
        "deliver each watch event twice",
        (),
        (D, X),
        may_duplicate=True,
    ),
    FaultKind(
        Family.XENSTORE,
        "watch-drop",
        "lose watch events",
        (),
        (D, X),
        may_lose=True,
    ),
    FaultKind(
        Family.XENSTORE,
        "watch-flood",
        "fire watch events as fast as a hostile domain can cause them (XSA-349)",
        (Param("rate", float, 5000.0, "events per second", 1.0, 1e6),),
        (D, X),
        may_lose=True,  # events past xenstored's per-connection bound are dropped
        may_duplicate=True,
    ),
    FaultKind(
        Family.XENSTORE,
        "commit-eagain",
        "fail transaction commits with EAGAIN (clients must retry)",
        (Param("one_in", int, 1, "fail one commit in every N", 1, 1e6),),
        (D, X),
    ),
    FaultKind(
        Family.XENSTORE,
        "conn-reset",
        "reset a domain's xenstore connection",
        (),
        (D,),
        may_lose=True,
    ),
    FaultKind(
        Family.XENSTORE,
        "xenstored-kill",
        "kill -9 xenstored; restart it from its persisted store on the same addresses at the stop",
        (Param("restart", bool, True, "restart xenstored when the fault stops"),),
        (X,),
        may_lose=True,
    ),
    # -- processes -----------------------------------------------------------------------
    FaultKind(
        Family.PROCESS,
        "kill",
        "kill a domain's process",
        (Param("signal", str, "SIGKILL", "signal sent", choices=_SIGNALS),),
        (D,),
        may_lose=True,
    ),
    FaultKind(
        Family.PROCESS,
        "stop",
        "pause a domain's process with SIGSTOP, SIGCONT when the fault stops",
        (),
        (D,),
        # A stopped guest posts no rx buffers: its backend tail-drops frames for it once the
        # rx backlog is full, as Linux netback does (backends/netback/queue.py).
        may_lose=True,
    ),
    FaultKind(
        Family.PROCESS,
        "restart",
        "kill a domain's process and start it again when the fault stops",
        (Param("signal", str, "SIGKILL", "signal sent", choices=_SIGNALS),),
        (D,),
        may_lose=True,
    ),
    # -- links between domains -----------------------------------------------------------
    FaultKind(
        Family.LINK,
        "delay",
        "hold a link's output for a delay plus a uniform jitter",
        (
            _seconds("delay", 0.01, "seconds added to each message", 10.0),
            _seconds("jitter", 0.0, "extra uniform 0..jitter seconds", 10.0),
        ),
        (L, D),
    ),
    FaultKind(
        Family.LINK,
        "loss",
        "lose link messages: the reliable link fails at the first loss and is redialled",
        (),
        (L, D),
        may_lose=True,
    ),
    FaultKind(Family.LINK, "duplicate", "send link messages twice", (), (L, D), may_duplicate=True),
    FaultKind(
        Family.LINK,
        "reorder",
        "hold a message and release it after the next one",
        (Param("hold", int, 1, "messages sent ahead of the held one", 1, 64),),
        (L, D),
    ),
    FaultKind(
        Family.LINK,
        "corrupt",
        "alter link messages (a corrupter may be supplied; otherwise caught as by a"
        " checksum: the link fails)",
        (),
        (L, D),
        may_lose=True,
    ),
    FaultKind(
        Family.LINK,
        "bandwidth",
        "limit a link's throughput with a token bucket",
        (
            Param("rate", float, 1e6, "bytes per second", 1.0, 1e12),
            Param("burst", float, 65536.0, "bucket size in bytes", 1.0, 1e12),
        ),
        (L, D),
    ),
    FaultKind(
        Family.LINK,
        "partition",
        "cut a link one way or both ways: it fails at each message across the cut until healed",
        (
            Param(
                "direction",
                str,
                "both",
                "one-way: from the first name to the second",
                choices=("both", "one-way"),
            ),
            Param("mode", str, "drop", "drop messages, or fail the link", choices=("drop", "fail")),
        ),
        (L, D),
        may_lose=True,
    ),
    # -- storage -------------------------------------------------------------------------
    FaultKind(
        Family.STORAGE,
        "eio",
        "fail reads or writes of a sector range with EIO (a write clears a bad sector)",
        (
            Param("op", str, "read", "operations that fail", choices=("read", "write", "both")),
            Param("sector", int, 0, "first bad 512-byte sector", 0, 1 << 40),
            Param("sectors", int, 8, "number of bad sectors", 1, 1 << 40),
        ),
        (V,),
    ),
    FaultKind(
        Family.STORAGE,
        "latency",
        "delay every storage call",
        (_seconds("delay", 0.01, "seconds per call", 10.0),),
        (V,),
    ),
    FaultKind(Family.STORAGE, "enospc", "fail every write (the disk is full)", (), (V,)),
    FaultKind(
        Family.STORAGE,
        "drop-writes",
        "acknowledge writes without keeping them (a lying disk)",
        (),
        (V,),
        loses_cache=True,
    ),
    FaultKind(
        Family.STORAGE,
        "power-cut",
        "lose the volatile write cache: only writes covered by a completed flush survive",
        (),
        (V,),
        loses_cache=True,
    ),
    # -- devices -------------------------------------------------------------------------
    FaultKind(
        Family.DEVICE,
        "detach-reattach",
        "detach a vbd or vif through the xenbus close handshake, re-attach it under the same"
        " id with the same configuration when the fault stops",
        (
            _seconds("grace", 2.0, "seconds the close handshake has before `force` applies", 20.0),
            Param("force", bool, True, "remove the device after `grace` even if not Closed"),
        ),
        (V,),
        may_lose=True,
    ),
)

CATALOGUE: Mapping[str, FaultKind] = {k.id: k for k in KINDS}


def kind(kind_id: str) -> FaultKind:
    """The kind named `family.name`; KeyError if there is none."""
    return CATALOGUE[kind_id]


def markdown_table() -> str:
    """The catalogue as a Markdown table (docs/faults.md carries this text)."""
    lines = [
        "| kind | targets | parameters | description |",
        "|---|---|---|---|",
    ]
    for k in KINDS:
        params = ", ".join(
            f"`{p.name}` ({p.type.__name__}, {p.default!r}, {p.describe_range()})" for p in k.params
        )
        targets = ", ".join(t.value for t in k.targets)
        note = f" (not injectable yet: {k.why_not})" if k.why_not else ""
        lines.append(f"| `{k.id}` | {targets} | {params or '-'} | {k.description}{note} |")
    return "\n".join(lines) + "\n"
