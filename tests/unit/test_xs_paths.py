"""Path rules (docs/misc/xenstore.txt, C is_valid_nodename)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpv.xenstore.paths import (
    ancestors_or_self,
    basename,
    canonicalize,
    child,
    domain_path,
    is_below_or_equal,
    is_valid_absolute,
    parent,
    relative_prefix,
)
from xenpv.xenstore.wire import XsError


@pytest.mark.parametrize(
    "path", ["/", "/a", "/a/b-c_d@e", "/local/domain/0", "/" + "x" * 3071, "/A/Z/0/9"]
)
def test_valid(path: str) -> None:
    assert is_valid_absolute(path)


@pytest.mark.parametrize(
    "path", ["", "a", "/a/", "//", "/a//b", "/a b", "/a.b", "/ä", "/" + "x" * 3072, "/a\0"]
)
def test_invalid(path: str) -> None:
    assert not is_valid_absolute(path)


def test_canonicalize() -> None:
    assert canonicalize("/x/y", 5) == "/x/y"
    assert canonicalize("x/y", 5) == "/local/domain/5/x/y"
    assert canonicalize("x", 0) == "/local/domain/0/x"
    for bad in ("", "x/", "@releaseDomain", "x//y", "r" * 2049):
        with pytest.raises(XsError) as exc:
            canonicalize(bad, 5)
        assert exc.value.errno_name == "EINVAL"
    assert canonicalize("r" * 2048, 5).endswith("r" * 2048)


def test_helpers() -> None:
    assert parent("/a/b") == "/a" and parent("/a") == "/" and basename("/a/b") == "b"
    assert child("/", "a") == "/a" and child("/a", "b") == "/a/b"
    assert list(ancestors_or_self("/a/b")) == ["/a/b", "/a", "/"]
    assert list(ancestors_or_self("/")) == ["/"]
    assert is_below_or_equal("/a/b", "/a") and is_below_or_equal("/a", "/a")
    assert not is_below_or_equal("/ab", "/a") and is_below_or_equal("/x", "/")
    assert domain_path(7) == "/local/domain/7"
    assert relative_prefix("x", 7) == "/local/domain/7/"
    assert relative_prefix("/x", 7) is None and relative_prefix("@x", 7) is None


@given(st.text(alphabet="ab/", min_size=1, max_size=12))
def test_canonical_paths_are_valid_or_refused(raw: str) -> None:
    try:
        path = canonicalize(raw, 3)
    except XsError as exc:
        assert exc.errno_name == "EINVAL"
    else:
        assert is_valid_absolute(path)
        assert list(ancestors_or_self(path))[-1] == "/"
