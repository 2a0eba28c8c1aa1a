"""xenstore: wire codec and sans-IO store here; the trio server and client live beside them."""

from __future__ import annotations

from xenpv.xenstore.changes import Change, ChangeFormatError
from xenpv.xenstore.client import Transaction, XenstoreClient, XenstoreConnectionError, connect
from xenpv.xenstore.quotas import Quotas
from xenpv.xenstore.store import ConnId, Outcome, Store
from xenpv.xenstore.wire import Message, XsError, XsProtocolError, XsType

__all__ = [
    "Change",
    "ChangeFormatError",
    "ConnId",
    "Message",
    "Outcome",
    "Quotas",
    "Store",
    "Transaction",
    "XenstoreClient",
    "XenstoreConnectionError",
    "XsError",
    "XsProtocolError",
    "XsType",
    "connect",
]
