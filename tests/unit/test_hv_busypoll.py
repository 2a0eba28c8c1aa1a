"""The adaptive busy-poll window (KVM halt-polling rule), sans-IO."""

from __future__ import annotations

import pytest

from xenpv.hv.busypoll import GROW_START, AdaptivePoll, max_window_from_env


def test_spin_returns_the_first_result_and_gives_up_after_the_window() -> None:
    # A window far longer than the three attempts take even on a loaded machine (a 50 us one
    # could end after the first sched_yield); spin returns at the answer, not at the window.
    answers = iter([None, None, 7])
    assert AdaptivePoll(10.0).spin(lambda: next(answers)) == 7
    poll = AdaptivePoll(50e-6)
    calls = 0

    def never() -> None:
        nonlocal calls
        calls += 1

    assert poll.spin(never) is None
    assert calls >= 1


def test_window_grows_after_short_sleeps_and_shrinks_to_zero_after_long_ones() -> None:
    poll = AdaptivePoll(40e-6)
    for _ in range(4):
        poll.blocked(1.0)  # long sleeps: polling was wasted
    assert poll.window == 0.0
    assert poll.spin(lambda: None) is None  # off: no attempt at all
    poll.blocked(5e-6)  # a short sleep: polling would have caught it
    assert poll.window == GROW_START
    poll.blocked(5e-6)
    assert poll.window == 2 * GROW_START
    for _ in range(5):
        poll.blocked(5e-6)
    assert poll.window == 40e-6  # capped at the maximum


def test_zero_maximum_never_polls() -> None:
    poll = AdaptivePoll(0.0)
    poll.blocked(1e-9)
    assert poll.window == 0.0
    assert poll.spin(lambda: 1) is None


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 50e-6), ("0", 0.0), ("12.5", 12.5e-6), ("-3", 0.0), ("x", 0.0)]
)
def test_maximum_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, expected: float
) -> None:
    if raw is None:
        monkeypatch.delenv("XENPV_BUSY_POLL_US", raising=False)
    else:
        monkeypatch.setenv("XENPV_BUSY_POLL_US", raw)
    assert max_window_from_env() == pytest.approx(expected)
