"""netback: the backend half of Xen's paravirtual network device (docs/net.md).

Layout (one file, one idea; docs/net.md "Backend" tells the whole story):
- `features.py`: the handshake's data (advertised keys, frontend keys → `FrontendConfig`);
- `tx.py`: guest transmit, sans-IO (`TxCore`: Linux netback's slot validation and responses);
- `rx.py`: guest receive, sans-IO (`RxCore`: slot placement, extras, responses);
- `offload.py`: netif checksum / GSO flags ⇄ `VirtioNetHdr` switch metadata;
- `queue.py`: one queue at the trio edge (event channels, batched grant copies, backlog);
- `vif.py`: the xenbus driver (`Vif`) and `serve()`, the domain process's entry point.
"""

from __future__ import annotations

from backends.netback.features import NetbackConfigError, advertise_keys
from backends.netback.rx import RxFatal
from backends.netback.tx import TxFatal
from backends.netback.vif import Vif, VifStats, serve

__all__ = [
    "NetbackConfigError",
    "RxFatal",
    "TxFatal",
    "Vif",
    "VifStats",
    "advertise_keys",
    "serve",
]
