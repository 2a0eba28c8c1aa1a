"""The self-test checks its request too (the CLI refuses such values first)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio

from xenpv.runtime.selftest import net_check


@pytest.mark.parametrize("frames", [0, -6])
async def test_net_check_refuses_no_frames(frames: int) -> None:
    port = cast(Any, None)  # never touched: the check stops before it sends anything
    with trio.fail_after(5):
        result = await net_check("net-a-to-b", port, bytes(6), frames, 1.0)
    assert result["ok"] is False
    assert result["detail"] == f"asked for {frames} frames; expected at least 1"
    assert "rtt_ms" not in result
