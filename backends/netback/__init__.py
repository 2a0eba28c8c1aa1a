"""netback: the backend half of Xen's paravirtual network device (docs/net.md).

Layout (one file, one idea; docs/net.md "Backend" tells the whole story):
- `keys.py`: the handshake's data (advertised keys, frontend keys → `FrontendConfig`) and the
  toolstack's `xenpv-*` keys;
- `tx.py`: guest transmit, sans-IO (`TxCore`: Linux netback's slot validation and responses);
- `rx.py`: guest receive, sans-IO (`RxCore`: slot placement, extras, responses);
- `offload.py`: netif checksum / GSO flags ⇄ `VirtioNetHdr` switch metadata;
- `queue.py`: one queue at the trio edge (event channels, batched grant copies, backlog);
- `device.py`: the xenbus driver (`Vif`) and `serve()`, the domain process's entry point.
"""

from __future__ import annotations

from backends.netback.device import Vif, VifStats, serve
from backends.netback.keys import NetbackConfigError, advertise_keys
from backends.netback.rx import RxFatal
from backends.netback.tx import TxFatal

__all__ = [
    "NetbackConfigError",
    "RxFatal",
    "TxFatal",
    "Vif",
    "VifStats",
    "advertise_keys",
    "serve",
]
