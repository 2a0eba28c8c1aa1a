"""`xenpv xenstored --metrics HOST:PORT` as a user runs it: the port serves exposition text
that prometheus_client's parser reads, with xenstored's counters (docs/metrics.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.hv_pair import REPO
from xenpv.toolstack.supervisor import stop_popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_xenstored_metrics_port_serves_parseable_counters(tmp_path: Path) -> None:
    port = free_port()
    sock = tmp_path / "xs.sock"
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "xenpv", "--log-level", "warning", "xenstored"),
            f"--socket={sock}",
            f"--data-dir={tmp_path / 'data'}",
            f"--metrics=127.0.0.1:{port}",
            f"--ready-fd={write_fd}",
        ],
        pass_fds=(write_fd,),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as ready:
            assert ready.readline().startswith(b"READY"), "xenstored did not start"
        probe = subprocess.run(
            [sys.executable, "-m", "xenpv", "probe", "xenstored", f"--xenstore=unix:{sock}"],
            capture_output=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=REPO,
        )
        assert probe.returncode == 0, probe.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        stop_popen(proc, 15)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ops = {s.labels["op"]: s.value for s in families["xenpv_xenstore_ops"].samples}
    assert ops.get("read", 0) >= 1  # the probe read the tree
    assert "xenpv_xenstore_watch_events_dropped" in families
