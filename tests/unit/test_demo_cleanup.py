"""A demo (or interop run) in a temporary directory removes it, but keeps the logs after a
failure and says where they are (under the error line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.toolstack.supervisor import remove_temp_dir


def _state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "xenpv-demo-x"
    for sub in ("logs", "keys", "xenstore", "links"):
        (state / sub).mkdir(parents=True)
    (state / "logs" / "guest4k.log").write_text("{}\n")
    (state / "keys" / "guest4k.key").write_text("secret\n")
    (state / "guest4k.img").write_bytes(b"\0" * 512)
    (state / "cluster.json").write_text("{}")
    return state


def test_success_removes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_dir(tmp_path)
    assert remove_temp_dir(state, keep_logs=False) is None
    assert not state.exists()
    assert capsys.readouterr().err == ""


def test_failure_keeps_only_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_dir(tmp_path)
    assert remove_temp_dir(state, keep_logs=True) == state / "logs"
    assert sorted(p.name for p in state.iterdir()) == ["logs"]
    assert (state / "logs" / "guest4k.log").read_text() == "{}\n"
    assert capsys.readouterr().err == ""  # the caller says where, under its error line


def test_failure_without_logs_removes_everything(tmp_path: Path) -> None:
    state = tmp_path / "xenpv-demo-y"
    state.mkdir()
    assert remove_temp_dir(state, keep_logs=True) is None
    assert not state.exists()
