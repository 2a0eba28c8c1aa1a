"""The compose building blocks on one host, against a real xenstored: `xenpv probe` and
`xenpv toolstack apply|check` (the full multi-host run is test_multihost.py, root only)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.integration import xenpv_cli
from tests.integration.conftest import Xenstored
from xenpv.toolstack.topology import default_topology

TIMEOUT = 60


def xenpv(*args: str) -> subprocess.CompletedProcess[str]:
    return xenpv_cli.xenpv(*args, timeout=TIMEOUT)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("xenpv:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_probe_xenstored_on_both_listeners(xenstored: Xenstored) -> None:
    result = xenpv("probe", "xenstored", "--xenstore", xenstored.unix, "--xenstore", xenstored.tcp)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("answers DIRECTORY /")
    assert lines[1].endswith("answers the authentication hello")


def test_probe_of_nothing_is_one_line_and_exit_1(xs_workdir: Path) -> None:
    line = one_error_line(xenpv("probe", "xenstored", "--xenstore", f"unix:{xs_workdir}/none"))
    assert "xenstored at unix:" in line
    line = one_error_line(
        xenpv("probe", "domain", "guest4k", "--xenstore", "tcp:127.0.0.1:1", "--timeout", "3")
    )
    assert "guest4k" in line


def test_apply_creates_domains_keys_and_devices_once(
    xenstored: Xenstored, xs_workdir: Path
) -> None:
    keys = xs_workdir / "keys"
    apply = (
        "toolstack",
        "apply",
        "--xenstore",
        xenstored.unix,
        "--keys-dir",
        str(keys),
        "--image-dir",
        str(xs_workdir / "images"),
        "--endpoint",
        "tcp:{name}:7100",
        "--json",
    )
    result = xenpv(*apply)
    assert result.returncode == 0, result.stderr
    domids = json.loads(result.stdout.splitlines()[-1])["domains"]
    topo = default_topology()
    assert set(domids) == {d.name for d in topo.domains}
    for name, domid in domids.items():
        key = keys / f"{name}.key"
        assert key.read_text().split()[0] == str(domid)
        assert os.stat(key).st_mode & 0o777 == 0o600
    # What the domains will find: their endpoint by name, their devices (dom0 view).
    link = xenpv("probe", "domain", "guest16k", "--xenstore", xenstored.unix)
    assert "its process is not ready" in one_error_line(link)
    # Over TCP with the domain's own key: the same answer, as that domain.
    own = xenpv(
        "probe",
        "domain",
        "guest16k",
        "--xenstore",
        xenstored.tcp,
        "--key-file",
        str(keys / "guest16k.key"),
    )
    assert f"guest16k ({domids['guest16k']}): its process is not ready" in one_error_line(own)
    wrong = xenpv(
        "probe",
        "domain",
        "guest4k",
        "--xenstore",
        xenstored.tcp,
        "--key-file",
        str(keys / "guest16k.key"),
    )
    assert "named 'guest16k'" in one_error_line(wrong)
    # A domain's key authenticates the xenstored probe over TCP.
    authed = xenpv(
        "probe", "xenstored", "--xenstore", xenstored.tcp, "--key-file", str(keys / "guest4k.key")
    )
    assert authed.returncode == 0, authed.stderr
    assert authed.stdout.strip().endswith(f"answers DIRECTORY /local/domain/{domids['guest4k']}")
    # A second apply of the same topology changes nothing (docs/compose.md: re-run jobs).
    before = {name: (keys / f"{name}.key").read_text() for name in domids}
    again = xenpv(*apply)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1]) == {"domains": domids, "created": False}
    assert {name: (keys / f"{name}.key").read_text() for name in domids} == before


def test_check_without_guests_fails_clearly(xenstored: Xenstored) -> None:
    line = one_error_line(xenpv("toolstack", "check", "--xenstore", xenstored.unix))
    assert "no guest has a device" in line
