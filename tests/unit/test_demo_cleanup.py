"""A demo (or interop run) in a temporary directory removes it, but keeps the logs after a
failure and says where they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.commands.demo import remove_state_dir


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
    remove_state_dir(state, keep_logs=False)
    assert not state.exists()
    assert capsys.readouterr().err == ""


def test_failure_keeps_only_the_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state_dir(tmp_path)
    remove_state_dir(state, keep_logs=True)
    assert sorted(p.name for p in state.iterdir()) == ["logs"]
    assert (state / "logs" / "guest4k.log").read_text() == "{}\n"
    assert capsys.readouterr().err == f"xenpv: logs kept in {state / 'logs'}\n"


def test_failure_without_logs_removes_everything(tmp_path: Path) -> None:
    state = tmp_path / "xenpv-demo-y"
    state.mkdir()
    remove_state_dir(state, keep_logs=True)
    assert not state.exists()
