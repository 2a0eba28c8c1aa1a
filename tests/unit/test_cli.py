from __future__ import annotations

import subprocess
import sys

from xenpv import __version__
from xenpv.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenpv", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"xenpv {__version__}"


def test_unknown_flag_is_one_clear_error_without_traceback() -> None:
    result = run_cli("--log-level", "loud", "bench")
    assert result.returncode == 2
    assert "argument --log-level: invalid choice: 'loud'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_command_is_a_usage_error() -> None:
    try:
        main([])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("argparse should exit on a missing command")
