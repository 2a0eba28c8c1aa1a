"""A small YAML emitter for manifests: dicts, lists, strings, ints, bools and None.

Pure and dependency-free (PyYAML is only a test dependency). Keys keep their insertion order;
a string is written plain only when YAML would read it back as that same string, as a literal
block (`|`) when it has several lines, and double-quoted (JSON escapes, valid YAML) otherwise.
`tests/unit/test_k8s_yaml.py` reads every emitted document back with PyYAML.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Plain scalars we allow: no indicator first, nothing YAML could read as another type.
_PLAIN = re.compile(r"^(?:[A-Za-z_./$]|-[A-Za-z-])[A-Za-z0-9_./:$@+=-]*$")
# Characters YAML does not allow unescaped (outside its printable set), e.g. DEL, C1 controls.
_UNPRINTABLE = re.compile("[^\t\n\r\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~", ".inf", ".nan"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return _quoted(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _quoted(text: str) -> str:
    """A double-quoted scalar: JSON's escapes (valid YAML) plus YAML's unprintables."""
    return _UNPRINTABLE.sub(
        lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False)
    )


def _block(text: str, indent: str) -> str | None:
    """A literal block for a multi-line string, or None when one cannot hold it exactly."""
    if (
        "\n" not in text
        or "\r" in text
        or "\t" in text
        or text.startswith((" ", "\n"))
        or _UNPRINTABLE.search(text)
    ):
        return None
    body = text.removesuffix("\n")
    if body.endswith("\n") or any(line.endswith(" ") for line in body.split("\n")):
        return None  # trailing blank lines or spaces: quoted instead
    chomp = "" if text.endswith("\n") else "-"
    return f"|{chomp}\n" + "\n".join(f"{indent}{line}" if line else "" for line in body.split("\n"))


def _node(value: Any, indent: str) -> list[str]:
    """Lines for `value` as the content of a mapping key or list item at `indent`."""
    if isinstance(value, Mapping):
        if not value:
            return ["{}"]
        out: list[str] = []
        for key, item in value.items():
            out += _entry(f"{_scalar(str(key))}:", item, indent)
        return out
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            return ["[]"]
        out = []
        for item in value:
            out += _entry("-", item, indent)
        return out
    return [_scalar(value)]


def _entry(head: str, value: Any, indent: str) -> list[str]:
    inner = indent + "  "
    if isinstance(value, str):
        block = _block(value, inner)
        if block is not None:
            return [f"{indent}{head} {block}"]
    nested = (isinstance(value, Mapping) and value) or (
        isinstance(value, Sequence) and not isinstance(value, str) and value
    )
    if not nested:
        return [f"{indent}{head} {_node(value, inner)[0]}"]
    if head == "-":
        # A list item's first line goes after the dash: "- key: value".
        lines = _node(value, inner)
        return [f"{indent}- {lines[0][len(inner) :]}", *lines[1:]]
    return [f"{indent}{head}", *_node(value, inner)]


def dump(document: Mapping[str, Any]) -> str:
    """One YAML document (a mapping), newline-terminated."""
    return "\n".join(_node(document, "")) + "\n"


def dump_all(documents: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document stream: documents separated by `---` lines."""
    return "---\n".join(dump(d) for d in documents)
