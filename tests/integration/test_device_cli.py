"""`xenpv device attach|detach|list` against a detached `xenpv cluster up`: a disk and a vif
attached to a running guest, listed with both xenbus states, detached through the xenbus close
(both ends Closed), attached again under the same id; bad input is one line and exit 2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.integration.xenpv_cli import xenpv

TOPOLOGY = """
[[domain]]
name = "be"
role = "backend"

[[domain]]
name = "g"
role = "guest"
"""


def test_attach_list_detach_reattach() -> None:
    with tempfile.TemporaryDirectory(prefix="xenpv-dev-") as tmp:
        topo, state = Path(tmp) / "t.toml", Path(tmp) / "state"
        topo.write_text(TOPOLOGY)
        up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach")
        assert up.returncode == 0, up.stderr
        sd = ("--state-dir", str(state))
        try:
            vbd = xenpv("device", "attach", "vbd", *sd, "g", "--image", "d.img", "--size", "4M")
            assert vbd.returncode == 0, vbd.stderr
            assert "attached xvda to g" in vbd.stdout
            vif = xenpv("device", "attach", "vif", *sd, "g", "--mac", "00:16:3e:00:00:42")
            assert vif.returncode == 0, vif.stderr
            listed = xenpv("device", "list", *sd, "--json")
            assert listed.returncode == 0, listed.stderr
            rows = json.loads(listed.stdout)
            assert {r["device"] for r in rows} == {"vbd xvda", "vif0"}
            assert all(r["frontend"] == "g" and r["backend"] == "be" for r in rows)

            again = xenpv("device", "attach", "vbd", *sd, "g", "--vdev", "xvda")
            assert again.returncode == 2 and "already exists" in again.stderr

            for device in ("xvda", "vif0"):
                out = xenpv("device", "detach", *sd, "g", device, "--timeout", "30")
                assert out.returncode == 0, out.stderr
                assert "closed through xenbus (frontend Closed, backend Closed)" in out.stdout
            assert json.loads(xenpv("device", "list", *sd, "--json").stdout) == []
            # the backend created the image under the state directory when it connected
            assert (state / "d.img").stat().st_size == 4 << 20

            vbd = xenpv("device", "attach", "vbd", *sd, "g", "--image", "d.img", "--vdev", "xvda")
            assert vbd.returncode == 0, vbd.stderr
            out = xenpv("device", "detach", *sd, "g", "vbd/51712")
            assert out.returncode == 0 and "closed through xenbus" in out.stdout, out.stderr

            for bad, message in (
                (("detach", *sd, "g", "xvdc"), "g has no device xvdc"),
                (("detach", *sd, "g", "eth0"), "expected a device such as xvdb"),
                (("attach", "vbd", *sd, "nosuch"), "no domain named 'nosuch'"),
                (("attach", "vif", *sd, "g", "--mac", "01:00:00:00:00:01"), "not unicast"),
                (("detach", *sd, "g", "xvda", "--timeout", "-1"), "--timeout"),
            ):
                result = xenpv("device", *bad)
                assert result.returncode == 2, (bad, result.stderr)
                assert message in result.stderr and len(result.stderr.splitlines()) == 1
        finally:
            down = xenpv("cluster", "down", *sd)
            assert down.returncode == 0, down.stderr
