"""The one key grammar: `parse_uint` / `parse_flag` read numbers as Linux's `%u` scan does,
and every driver reads a key through them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.blkback.keys import BackendConfig, parse_frontend, requested_queues
from backends.netback.keys import parse_frontend as netback_parse
from frontends.blkfront.keys import flag as blkfront_flag
from frontends.blkfront.keys import number as blkfront_number
from frontends.netfront.keys import parse_features
from xenpv.xenbus.keys import UINT_MAX, KeyValueError, flag, parse_flag, parse_uint

KERNEL_SPACE = " \t\n\v\f\r"  # the kernel's isspace() in ASCII


def linux_scan_u(text: str) -> int | None:
    """vsscanf("%u") written out the kernel's way: skip_spaces, then digits until a non-digit.
    None: the conversion fails (xenbus_scanf returns an error)."""
    i = 0
    while i < len(text) and text[i] in KERNEL_SPACE:
        i += 1
    start = i
    while i < len(text) and text[i] in "0123456789":
        i += 1
    return int(text[start:i]) if i > start else None


values = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=KERNEL_SPACE + "0123456789+-x abc\u00a0\u0663", max_size=14),
    st.integers(0, 2 * UINT_MAX).map(str),
    st.builds(
        lambda pre, n, post: pre + str(n) + post,
        st.text(alphabet=KERNEL_SPACE, max_size=3),
        st.integers(0, UINT_MAX),
        st.text(max_size=4),
    ),
)


@settings(max_examples=500)
@given(text=values)
def test_strict_reads_what_linux_reads_and_refuses_the_rest(text: str) -> None:
    want = linux_scan_u(text)
    if want is None or want > UINT_MAX:
        with pytest.raises(KeyValueError, match="reading ring-ref"):
            parse_uint(text, "ring-ref")
    else:
        assert parse_uint(text, "ring-ref") == want
        assert parse_uint(text.encode(), "ring-ref") == want


@settings(max_examples=300)
@given(text=values, default=st.integers(0, 9))
def test_with_a_default_unreadable_reads_as_the_default(text: str, default: int) -> None:
    want = linux_scan_u(text)
    expected = default if want is None or want > UINT_MAX else want
    assert parse_uint(text, "k", default=default) == expected
    assert parse_flag(text, "k", default=bool(default)) == (expected != 0)


@settings(max_examples=300)
@given(text=values)
def test_strict_with_a_default_only_forgives_absence(text: str) -> None:
    want = linux_scan_u(text)
    if want is None or want > UINT_MAX:
        with pytest.raises(KeyValueError):
            parse_uint(text, "xenpv-max-queues", default=4, strict=True)
        with pytest.raises(KeyValueError):
            parse_flag(text, "xenpv-flush", default=True, strict=True)
    else:
        assert parse_uint(text, "xenpv-max-queues", default=4, strict=True) == want


@given(n=st.integers(0, UINT_MAX))
def test_what_writers_write_reads_back(n: int) -> None:
    assert parse_uint(str(n), "k") == n
    assert parse_flag(str(flag(bool(n))), "k") is bool(n)


@pytest.mark.parametrize(
    ("raw", "want"),
    [("  12", 12), ("12\n", 12), ("12abc", 12), ("007", 7), ("0x10", 0), ("1.5", 1)],
)
def test_linux_reads_these(raw: str, want: int) -> None:
    assert parse_uint(raw, "k") == want


@pytest.mark.parametrize("raw", ["", " ", "abc", "-1", "+1", "\u0663", "\u00a012", "4294967296"])
def test_linux_refuses_these(raw: str) -> None:
    with pytest.raises(KeyValueError):
        parse_uint(raw, "k")


def test_absence_is_an_error_without_a_default_and_the_message_is_one_line() -> None:
    with pytest.raises(KeyValueError, match=r"^reading event-channel: missing$"):
        parse_uint(None, "event-channel")
    assert parse_uint(None, "k", default=3) == 3
    assert parse_flag(None, "feature-sg") is False
    with pytest.raises(KeyValueError, match=r"^reading k: 'yes' is not an unsigned integer$"):
        parse_flag("yes", "k", strict=True)


def test_a_64_bit_key_takes_64_bit_values() -> None:
    big = str(UINT_MAX + 1)
    assert parse_uint(big, "sectors", maximum=2**64 - 1) == UINT_MAX + 1
    assert parse_uint(big, "feature-x", default=0) == 0  # above 32 bits: unreadable


@settings(max_examples=200)
@given(raw=values)
def test_every_driver_reads_a_key_alike(raw: str) -> None:
    """The same value means the same thing to both ends of both device classes."""
    on = parse_flag(raw, "feature-sg")
    assert parse_features({"feature-sg": raw}).sg is on  # netfront
    assert blkfront_flag({"feature-persistent": raw}, "feature-persistent") is on
    ring = {"tx-ring-ref": "8", "rx-ring-ref": "9", "event-channel": "3"}
    flags = {"request-rx-copy": "1", "feature-sg": raw}
    assert netback_parse(flags, [ring], ["fe"]).can_sg is on
    keys = {"feature-persistent": raw, "ring-ref": "8", "event-channel": "3"}
    assert parse_frontend(keys, BackendConfig()).persistent is on  # blkback

    queues = parse_uint(raw, "multi-queue-max-queues", default=1)
    assert parse_features({"multi-queue-max-queues": raw}).max_queues == max(1, queues)
    assert blkfront_number({"multi-queue-max-queues": raw}, "multi-queue-max-queues", 1) == queues
    wanted = parse_uint(raw, "multi-queue-num-queues", default=1)
    if 1 <= wanted <= BackendConfig().max_queues:
        assert requested_queues({"multi-queue-num-queues": raw}, BackendConfig()) == wanted
