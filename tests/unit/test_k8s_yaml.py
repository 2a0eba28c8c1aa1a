"""`xenpv.k8s.yamlout`: whatever it writes, PyYAML reads back as the same data."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from xenpv.k8s import yamlout

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=40)
keys = st.text(min_size=1, max_size=12)
documents = st.dictionaries(
    keys,
    st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=12,
    ),
    max_size=6,
)


@given(documents)
def test_any_document_reads_back(document: dict[str, Any]) -> None:
    assert yaml.safe_load(yamlout.dump(document)) == document


@pytest.mark.parametrize(
    "text",
    ["true", "no", "1.0", "0x1f", "-1", ".inf", "a: b", "# c", "- x", "*x", "&y", "", " lead"],
)
def test_strings_yaml_would_misread_are_quoted(text: str) -> None:
    written = yamlout.dump({"v": text})
    assert written.startswith('v: "') and yaml.safe_load(written) == {"v": text}


def test_multiline_text_is_a_literal_block() -> None:
    toml = 'transport = "auto"\n\n[[domain]]\nname = "backend"\n'
    written = yamlout.dump({"data": {"topology.toml": toml}})
    assert written.startswith("data:\n  topology.toml: |\n    transport")
    assert yaml.safe_load(written) == {"data": {"topology.toml": toml}}


def test_a_stream_separates_documents() -> None:
    written = yamlout.dump_all([{"a": 1}, {"b": [1, {"c": []}]}])
    assert list(yaml.safe_load_all(written)) == [{"a": 1}, {"b": [1, {"c": []}]}]
