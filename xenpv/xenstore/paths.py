"""xenstore path rules (docs/misc/xenstore.txt, C xenstored `is_valid_nodename`).

A path is absolute (`/a/b`) or relative to the caller's home `/local/domain/<domid>`. Valid
characters are `A-Za-z0-9-/_@`; no `//`, no trailing `/` (except the root `/`), not empty.
A relative path as sent may be at most XENSTORE_REL_PATH_MAX (2048) bytes, an absolute one
(and any path after canonicalisation) at most XENSTORE_ABS_PATH_MAX (3072).

Special paths start with `@` (`@introduceDomain`, `@releaseDomain`); they are only meaningful
as watch paths (and for GET_PERMS / SET_PERMS of the special nodes), never as tree nodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from xenpv.xenstore.wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX, XsError

ROOT = "/"
INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

_VALID = re.compile(r"[A-Za-z0-9\-/_@]*")


def domain_path(domid: int) -> str:
    """The home directory of a domain, base of its relative paths."""
    return f"/local/domain/{domid}"


def is_valid_absolute(path: str) -> bool:
    """C `is_valid_nodename`: starts with `/`, no trailing `/`, no `//`, valid chars, length."""
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != ROOT:
        return False
    if "//" in path:
        return False
    if len(path) > XENSTORE_ABS_PATH_MAX:
        return False
    return _VALID.fullmatch(path) is not None


def canonicalize(path: str, domid: int) -> str:
    """Absolute form of a node path sent by `domid`, or XsError(EINVAL).

    Special `@` paths are refused here: callers that accept them check first.
    """
    if path.startswith("/"):
        absolute = path
    else:
        if not path or len(path) > XENSTORE_REL_PATH_MAX or path.startswith("@"):
            raise XsError("EINVAL", f"invalid path {path[:64]!r}")
        absolute = f"{domain_path(domid)}/{path}"
    if not is_valid_absolute(absolute):
        raise XsError("EINVAL", f"invalid path {path[:64]!r}")
    return absolute


def relative_prefix(path: str, domid: int) -> str | None:
    """The prefix to strip from event paths of a watch registered as `path` (None: absolute)."""
    if path.startswith("/") or path.startswith("@"):
        return None
    return domain_path(domid) + "/"


def parent(path: str) -> str:
    """Parent of an absolute non-root path."""
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else ROOT


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def child(path: str, name: str) -> str:
    return f"/{name}" if path == ROOT else f"{path}/{name}"


def ancestors_or_self(path: str) -> Iterator[str]:
    """`/a/b/c`, `/a/b`, `/a`, `/`: the watch paths that see an event on `path` (O(depth))."""
    yield path
    while path != ROOT:
        path = parent(path)
        yield path


def is_below_or_equal(path: str, top: str) -> bool:
    """True when `path` is `top` or inside its subtree."""
    if top == ROOT:
        return path.startswith("/")
    return path == top or path.startswith(top + "/")
