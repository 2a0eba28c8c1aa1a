"""Every argument is validated at the CLI boundary: a bad value is one line on stderr
(`xenpv <command>: error: argument ...`), exit status 2, no traceback, nothing started."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from xenpv.cli import main
from xenpv.commands import args as types


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run `xenpv argv`; it must stop in the parser with exit 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--frames", "0"], "xenpv demo: error: argument --frames: expected a positive"),
        (["demo", "--frames", "-1"], "argument --frames: expected a positive integer, got '-1'"),
        (["demo", "--frames", "many"], "argument --frames: expected a positive integer"),
        (["demo", "--timeout", "-5"], "argument --timeout: expected a number > 0, got '-5'"),
        (["demo", "--timeout", "nan"], "argument --timeout: expected a number > 0"),
        (["demo", "--timeout", "inf"], "argument --timeout: expected a number > 0"),
        (["demo", "--block-bytes", "0"], "argument --block-bytes: expected a size > 0"),
        (["demo", "--block-bytes", "4Q"], "argument --block-bytes: expected a size in bytes"),
        (["cluster", "up", "f.toml", "--timeout", "0"], "xenpv cluster up: error: argument"),
        (["bench", "ring", "--batch", "0"], "xenpv bench ring: error: argument --batch"),
        (["bench", "ring", "--seconds", "-1"], "argument --seconds: expected a number > 0"),
        (["bench", "ring", "--pages", "17"], "argument --pages: expected an integer from 1 to 16"),
        (["bench", "net", "--queues", "5"], "argument --queues: expected an integer from 1 to 4"),
        (["bench", "net", "--iperf-seconds", "0"], "argument --iperf-seconds"),
        (["bench", "net-granule", "--repeat", "0"], "argument --repeat"),
        (["bench", "link", "--seconds", "0"], "argument --seconds"),
        (["bench", "blk", "--seconds", "-2"], "argument --seconds"),
        (["xenstored", "--data-dir", "d", "--tcp", "nohost"], "argument --tcp: expected HOST:PORT"),
        (["xenstored", "--data-dir", "d", "--tcp", "h:70000"], "argument --tcp: expected HOST"),
        (["xenstored", "--data-dir", "d", "--quota-node-size", "0"], "--quota-node-size"),
        (["xenstored", "--data-dir", "d", "--ready-fd", "1"], "argument --ready-fd: 1 is stdin"),
        (["xenstored", "--data-dir", "d", "--ready-fd", "999"], "descriptor 999 is not open"),
        (["probe", "xenstored", "--xenstore", "tcp:h:0"], "--xenstore: expected tcp:HOST:PORT"),
        (["probe", "xenstored", "--xenstore", "h:1"], "argument --xenstore: expected unix:PATH"),
        (["probe", "domain", "g", "--xenstore", "unix:/s", "--timeout", "0"], "--timeout"),
        (["domain", "--xenstore", "tcp:h:1", "--key-file", "/nonexistent"], "no such file"),
        (["toolstack", "check", "--xenstore", "unix:/s", "--frames", "0"], "--frames"),
        (["toolstack", "apply", "--xenstore", "unix:/s", "--keys-dir", "k", "--endpoint", "h"],
         "argument --endpoint: expected unix:PATH or tcp:HOST:PORT, {name}"),
        (["interop", "--only", ""], "argument --only: expected a non-empty text"),
        (["cluster", "logs", "--lines", "0"], "argument -n/--lines"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert expected in usage_error(capsys, *argv)


def test_state_dir_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("")
    line = usage_error(capsys, "demo", "--state-dir", str(file))
    assert line == f"xenpv demo: error: argument --state-dir: {file}: exists and is not a directory"
    line = usage_error(capsys, "cluster", "status", "--state-dir", str(file / "below"))
    assert f"{file} is not a directory" in line


def test_state_dir_from_the_environment_is_validated(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "f"
    file.write_text("")
    monkeypatch.setenv("XENPV_STATE_DIR", str(file))
    line = usage_error(capsys, "cluster", "down")
    assert "argument --state-dir" in line and "not a directory" in line


def test_socket_in_a_missing_directory_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    sock = tmp_path / "typo" / "xenstored.sock"
    line = usage_error(capsys, "xenstored", "--data-dir", str(tmp_path), "--socket", str(sock))
    assert f"directory {tmp_path / 'typo'} does not exist" in line
    assert not (tmp_path / "typo").exists()  # nothing was created


def test_topology_file_must_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "no such file" in usage_error(capsys, "cluster", "up", str(tmp_path / "nope.toml"))
    assert "is a directory" in usage_error(capsys, "cluster", "up", str(tmp_path))


def test_interop_report_needs_an_existing_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    line = usage_error(capsys, "interop", "--report", str(tmp_path / "no" / "r.html"))
    assert "argument --report" in line and "does not exist" in line


def test_missing_required_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = usage_error(capsys, "domain")
    assert line.startswith("xenpv domain: error: the following arguments are required")


def test_validators_accept_good_values(tmp_path: Path) -> None:
    assert types.positive_int("3") == 3
    assert types.non_negative_int("0") == 0
    assert types.positive_float("0.5") == 0.5
    assert types.non_negative_float("0") == 0.0
    assert types.byte_size("4M") == 4 << 20 and types.byte_size("512KiB") == 512 << 10
    assert types.byte_size("4096") == 4096
    assert types.int_range(1, 4)("4") == 4
    assert types.host_port("[::1]:0") == "[::1]:0"
    assert types.xenstore_address("tcp:xenstored:8766") == "tcp:xenstored:8766"
    assert types.xenstore_address("unix:/run/x.sock") == "unix:/run/x.sock"
    assert types.link_endpoint("tcp:0.0.0.0:7100") == "tcp:0.0.0.0:7100"
    assert types.endpoint_template("tcp:{name}:7100") == "tcp:{name}:7100"
    assert types.directory(str(tmp_path / "new" / "deeper")) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # validating creates nothing
    assert types.existing_dir(str(tmp_path)) == tmp_path
    assert types.output_file(str(tmp_path / "r.html")) == tmp_path / "r.html"
    assert types.socket_path(str(tmp_path / "s.sock")) == str(tmp_path / "s.sock")
    read_fd, write_fd = os.pipe()
    try:
        assert types.fd_number(str(write_fd)) == write_fd
    finally:
        os.close(read_fd)
        os.close(write_fd)
    with pytest.raises(argparse.ArgumentTypeError):
        types.non_negative_float("-0.1")
    with pytest.raises(argparse.ArgumentTypeError):
        types.non_negative_int("-1")


def test_command_lines_for_another_machine_check_paths_for_form_only() -> None:
    """docker-compose.yml's commands name the containers' paths (tests/unit/test_compose.py)."""
    from xenpv.cli import build_parser

    argv = ["domain", "--xenstore=tcp:xenstored:8766", "--key-file=/nonexistent/backend.key"]
    with types.paths_elsewhere():
        args = build_parser().parse_args(argv)
        assert types.socket_path("/nonexistent/dir/s.sock") == "/nonexistent/dir/s.sock"
        with pytest.raises(argparse.ArgumentTypeError):
            types.xenstore_address("xenstored:8766")  # the form is still checked
    assert args.key_file == Path("/nonexistent/backend.key")
    with pytest.raises(argparse.ArgumentTypeError):
        types.existing_file("/nonexistent/backend.key")  # and back to this machine's
