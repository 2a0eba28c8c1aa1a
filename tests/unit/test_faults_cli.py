"""`xenpv faults list|schedule|check` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from backends.storage import MemoryDisk
from tests.unit.faults_helpers import DISK_KEY, Recorder
from tests.unit.test_faults_checkers import AckWithoutKeeping
from xenpv.cli import main
from xenpv.faults.workloads import BlockWorker


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["faults", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("kind  link.partition") for line in lines)
    assert any(line.startswith("plan  smoke") for line in lines)
    assert main(["faults", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {p["name"] for p in out["plans"]} >= {"smoke", "power-cut"}
    assert any(k["kind"] == "storage.eio" for k in out["kinds"])


def test_schedule_is_stable_and_seeded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["faults", "schedule", "partition", "--seed", "7", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["faults", "schedule", "partition", "--seed", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == first["hash"]
    assert main(["faults", "schedule", "partition", "--seed", "8"]) == 0
    text = capsys.readouterr().out
    assert "link.partition" in text and first["hash"] not in text
    assert first["schedule"]["seed"] == 7


def test_schedule_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(
        "[run]\nduration = 20.0\nquiet = 5.0\n"
        '[[fault]]\nkind = "link.loss"\ntarget = "link:a-b"\nduration = 1.0\n'
        '[[fault]]\nkind = "link.loss"\ntarget = "any-link"\nduration = 1.0\n'
        '[[fault]]\nkind = "link.loss"\ntarget = "domain:zz"\nduration = 1.0\n'
    )
    assert main(["faults", "schedule", str(plan)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "xenpv: error: fault[0].target: link:a-b: no two domains named like that"
    plan.write_text(plan.read_text().replace("link:a-b", "any-link"))
    assert main(["faults", "schedule", str(plan)]) == 2
    assert capsys.readouterr().err.strip() == (
        "xenpv: error: fault[2].target: no domain named 'zz'"
    )


async def _history(storage: MemoryDisk) -> str:
    rec = Recorder()
    worker = BlockWorker(storage, rec.writer, "guest4k/blk0", DISK_KEY, blocks=4, block_size=512)
    for block in range(4):
        await worker.write(block)
        await worker.write(block)
    await worker.verify_all()
    for d in rec.schedule.topology.devices:
        for end in ("frontend", "backend"):
            rec("toolstack", "info", "state", f"state:{d.guest}:{d.cls}:{d.name}:{end}", 4)
        rec("toolstack", "invoke", "probe", d.key)
        rec("toolstack", "ok", "probe", d.key)
    rec.writer.close()
    return rec.text


async def test_check_pass_fail_and_tamper(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(10):
        good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
        good_text = await _history(MemoryDisk(64 * 512))
        bad_text = await _history(AckWithoutKeeping(64 * 512))
    good.write_text(good_text)
    bad.write_text(bad_text)
    report = tmp_path / "r.html"
    assert main(["faults", "check", str(good), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS: plan test, seed 1")
    html = report.read_text()
    assert (
        "<svg" in html
        and "PASS" in html
        and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    )

    assert main(["faults", "check", str(bad), "--json", "--report", str(report)]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert not verdict["ok"] and verdict["violations"][0]["checker"] == "block"
    assert "First violation" in report.read_text()

    lines = good.read_text().splitlines()
    raw = json.loads(lines[5])
    raw["value"] = "guest4k/blk0/3/99"
    lines[5] = json.dumps(raw)
    good.write_text("\n".join(lines) + "\n")
    assert main(["faults", "check", str(good)]) == 1
    err = capsys.readouterr().err
    assert f"{good}:6: digest mismatch" in err
    good.write_text(good_text.split("\n", 3)[0] + "\n")  # only the schedule: cut off
    assert main(["faults", "check", str(good)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL (unfinished history") and "no end line" in out
    assert main(["faults", "check", str(tmp_path / "none.jsonl")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_report_is_well_formed_with_faults_and_states() -> None:
    import xml.etree.ElementTree as ET
    from html.parser import HTMLParser

    from xenpv.faults import report
    from xenpv.faults.checkers import check_all

    rec = Recorder()
    rec.fault("fault-start", "f0.0", "link.partition", "link:backend-guest4k")
    rec("guest4k/blk0", "invoke", "write", DISK_KEY + ":block=0", "a/0/1")
    rec("guest4k/blk0", "fail", "write", DISK_KEY + ":block=0", "I/O error <&>")
    rec("toolstack", "info", "state", "state:guest4k:vbd:xvda:frontend", 5)
    rec.fault("fault-stop", "f0.0", "link.partition", "link:backend-guest4k")
    rec("toolstack", "info", "state", "state:guest4k:vbd:xvda:frontend", "Connected")
    history = rec.history()
    page = report.render_html(history, check_all(history))
    HTMLParser().feed(page)
    svgs = page.split("<svg")[1:]
    assert len(svgs) == 3
    for chunk in svgs:
        ET.fromstring("<svg" + chunk.split("</svg>")[0] + "</svg>")  # well-formed XML
    assert "First violation" in page and "xenpv faults run test --seed 1" in page
    assert history.schedule.hash in page


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["faults", "swarm", "smoke", "--seeds", "0"], 2, "--seeds must be at least 1"),
        (["faults", "swarm", "smoke", "--seeds", "2", "--jobs", "0"], 2, "--jobs must be"),
        (["faults", "swarm", "smoke", "--seeds", "2", "--first-seed", "-1"], 2, "--first-seed"),
        (["faults", "run", "smoke", "--swarm"], 2, "--swarm needs --mode sim"),
        (["faults", "swarm", "process", "--seeds", "2"], 1, "cannot inject process."),
        (["faults", "shrink", "process", "--seed", "1"], 1, "cannot inject process."),
    ],
)
def test_swarm_and_shrink_refuse_in_one_line(
    argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
