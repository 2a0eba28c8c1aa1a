"""docker-compose.yml and Dockerfile, checked without a docker engine.

1. The compose file validates against the compose-spec JSON schema (vendored in tests/data).
2. Semantics the schema cannot see (`compose_problems`): every `depends_on` target exists,
   `service_healthy` only on services with a healthcheck, `service_completed_successfully`
   only on one-shot services, no dependency cycle, every command and healthcheck test is a
   valid `xenpv` invocation (parsed by `xenpv.cli.build_parser()`), named volumes and networks
   are declared; and the cluster wiring: one service per topology domain, running `xenpv
   domain` with that domain's key, listening where the toolstack publishes its endpoint,
   reaching xenstored where it listens.
3. Mutations of the file are each caught (the checker is not vacuous).
4. The Dockerfile: python:3.11-slim, `pip install .`, a non-root USER, only existing paths copied.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from xenpv.cli import build_parser
from xenpv.commands.args import paths_elsewhere
from xenpv.toolstack.topology import default_topology

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def as_argv(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def healthcheck_argv(service: dict[str, Any]) -> list[str] | None:
    test = service.get("healthcheck", {}).get("test")
    if test is None:
        return None
    argv = as_argv(test)
    if argv[:1] == ["CMD"]:
        return argv[1:]
    if argv[:1] == ["CMD-SHELL"]:
        return shlex.split(" ".join(argv[1:]))
    return argv  # the string form runs through a shell too


def parse_xenpv(argv: list[str]) -> tuple[Any, str]:
    """(namespace, "") if `argv` is a valid xenpv invocation, else (None, argparse's message)."""
    if argv[:1] != ["xenpv"]:
        return None, f"not a xenpv command: {argv[:1]}"
    err = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
            paths_elsewhere(),  # the container's paths, not this machine's
        ):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return None, err.getvalue().strip().splitlines()[-1] if err.getvalue() else "exit"
    return args, ""


def depends(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("depends_on", {})
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def named_volume(entry: Any) -> tuple[str | None, str]:
    """(volume name or None for a bind mount, target) of a volume entry."""
    if isinstance(entry, dict):
        source, target = entry.get("source"), entry["target"]
        return (source if entry.get("type", "volume") == "volume" else None), target
    source, _, rest = str(entry).partition(":")
    target = rest.split(":")[0]
    if source.startswith((".", "/", "~")):
        return None, target
    return source, target


def _opt(args: Any, name: str) -> Any:
    return getattr(args, name, None)


RESTARTING = ("always", "unless-stopped", "on-failure")


def compose_problems(doc: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    services: dict[str, Any] = doc.get("services", {})
    volumes = set((doc.get("volumes") or {}).keys())
    networks = set((doc.get("networks") or {}).keys())
    parsed: dict[str, Any] = {}
    for name, svc in services.items():
        for target, condition in depends(svc).items():
            if target not in services:
                problems.append(f"{name}: depends_on unknown service {target!r}")
                continue
            if condition not in CONDITIONS:
                problems.append(f"{name}: unknown condition {condition!r}")
            if condition == "service_healthy" and "healthcheck" not in services[target]:
                problems.append(f"{name}: service_healthy on {target}, which has no healthcheck")
            if condition == "service_completed_successfully" and services[target].get(
                "restart", "no"
            ) not in ("no", "on-failure"):
                problems.append(f"{name}: {target} must be a one-shot service (restart: no)")
        for entry in svc.get("volumes", []):
            source, _target = named_volume(entry)
            if source is not None and source not in volumes:
                problems.append(f"{name}: volume {source!r} is not declared")
        nets = svc.get("networks", [])
        for net in nets if isinstance(nets, list) else list(nets):
            if net not in networks:
                problems.append(f"{name}: network {net!r} is not declared")
        if "command" not in svc:
            problems.append(f"{name}: no command")
        else:
            args, why = parse_xenpv(as_argv(svc["command"]))
            if args is None:
                problems.append(f"{name}: command is not a valid xenpv invocation: {why}")
            parsed[name] = args
        check = healthcheck_argv(svc)
        # A long-running service (it has a healthcheck) comes back after a crash.
        if check is not None and svc.get("restart", "no") not in RESTARTING:
            problems.append(f"{name}: a long-running service needs a restart policy")
        if check is not None:
            args, why = parse_xenpv(check)
            if args is None or args.command != "probe":
                problems.append(f"{name}: healthcheck is not a valid xenpv probe: {why}")
    problems += _cycles(services)
    problems += _wiring(services, parsed)
    return problems


def _cycles(services: dict[str, Any]) -> list[str]:
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2 or name not in services:
            return
        if state.get(name) == 1:
            found.append("dependency cycle: " + " -> ".join([*path, name]))
            return
        state[name] = 1
        for target in depends(services[name]):
            visit(target, [*path, name])
        state[name] = 2

    for name in services:
        visit(name, [])
    return found


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def _wiring(services: dict[str, Any], parsed: dict[str, Any]) -> list[str]:
    """The cluster: xenstored, the toolstack apply job, one domain service per domain."""
    problems: list[str] = []
    by_cmd: dict[str, list[str]] = {}
    for name, args in parsed.items():
        if args is not None:
            key = args.command + ("/" + args.action if hasattr(args, "action") else "")
            by_cmd.setdefault(key, []).append(name)
    xsd = by_cmd.get("xenstored", [])
    apply = by_cmd.get("toolstack/apply", [])
    if len(xsd) != 1 or len(apply) != 1:
        return [f"want one xenstored and one toolstack apply service, got {xsd} and {apply}"]
    xs_args, ts_args = parsed[xsd[0]], parsed[apply[0]]
    if not xs_args.tcp:
        problems.append("xenstored has no --tcp listener for the domains")
    if ts_args.xenstore != f"unix:{xs_args.socket}":
        problems.append(f"toolstack talks to {ts_args.xenstore}, xenstored is at {xs_args.socket}")
    if apply[0] not in depends(services[xsd[0]]) and xsd[0] not in depends(services[apply[0]]):
        problems.append("the toolstack does not depend on xenstored")
    topo = default_topology() if ts_args.file is None else None
    assert topo is not None, "the compose toolstack applies the embedded topology"
    for spec in topo.domains:
        svc = services.get(spec.name)
        args = parsed.get(spec.name)
        if svc is None or args is None or args.command != "domain":
            problems.append(f"domain {spec.name}: no service of that name runs `xenpv domain`")
            continue
        deps = depends(svc)
        if deps.get(apply[0]) != "service_completed_successfully":
            problems.append(f"{spec.name}: must wait for the toolstack to complete")
        if args.xenstore != f"tcp:{xsd[0]}:{_port(xs_args.tcp)}":
            problems.append(f"{spec.name}: xenstore {args.xenstore} is not xenstored's listener")
        if args.key_file != ts_args.keys_dir / f"{spec.name}.key":
            problems.append(f"{spec.name}: key file {args.key_file} is not the one written")
        published = ts_args.endpoint.replace("{name}", spec.name)
        if args.listen is None or _port(args.listen) != _port(published):
            problems.append(f"{spec.name}: listens on {args.listen}, published {published}")
        if args.transport == "shm":
            problems.append(f"{spec.name}: shm cannot cross containers")
        mounts = {named_volume(v)[1].rstrip("/") for v in svc.get("volumes", [])}
        if str(ts_args.keys_dir) not in mounts:
            problems.append(f"{spec.name}: the keys volume is not mounted")
        check = healthcheck_argv(svc)
        probe, _ = parse_xenpv(check) if check else (None, "")
        if probe is None or probe.kind != "domain" or probe.name != spec.name:
            problems.append(f"{spec.name}: no `xenpv probe domain {spec.name}` healthcheck")
        elif spec.role == "guest" and not probe.connected:
            problems.append(f"{spec.name}: a guest is healthy only once --connected")
        if spec.role == "guest":
            for backend in {v.backend for v in (*topo.vbds, *topo.vifs) if v.frontend == spec.name}:
                if deps.get(backend) != "service_healthy":
                    problems.append(f"{spec.name}: should wait for its backend {backend}")
    return problems


# -- tests ---------------------------------------------------------------------------------


def test_vendored_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(load_compose()))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


def test_schema_rejects_a_malformed_file() -> None:
    schema = json.loads(SCHEMA.read_text())
    doc = load_compose()
    doc["services"]["xenstored"]["healthcheck"]["retries"] = "many"
    doc["services"]["backend"]["depends_on"]["toolstack"]["condition"] = "service_ready"
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    assert errors


def test_compose_file_is_consistent() -> None:
    assert compose_problems(load_compose()) == []


def test_compose_runs_three_page_sizes_and_a_check() -> None:
    doc = load_compose()
    topo = default_topology()
    assert sorted(d.page_size for d in topo.guests) == [4096, 16384, 65536]
    assert {d.name for d in topo.domains} <= set(doc["services"])
    check, _ = parse_xenpv(as_argv(doc["services"]["check"]["command"]))
    assert (check.command, check.action) == ("toolstack", "check")
    assert set(depends(doc["services"]["check"])) == {g.name for g in topo.guests}


def test_documented_one_liner_gives_checks_exit_status() -> None:
    # `up --abort-on-container-exit`/`--exit-code-from check` stop at the toolstack's exit.
    root = Path(__file__).resolve().parents[2]
    for doc in ("docs/compose.md", "README.md", "docker-compose.yml"):
        text = (root / doc).read_text()
        assert "docker compose up -d --build && docker compose wait check" in text, doc
        assert "--exit-code-from" not in text.replace("`--exit-code-from check`", ""), doc


def _mutate(path: list[Any], value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    doc = copy.deepcopy(load_compose())
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        old = node.get(path[-1]) if isinstance(node, dict) else node[path[-1]]
        if (
            isinstance(old, str) and old.startswith("--") and "=" in str(value)
        ):  # change an option's value only
            assert old.split("=")[0] == str(value).split("=")[0], (old, value)
        node[path[-1]] = value
    return doc


MUTATIONS = {
    "unknown dependency": (["services", "backend", "depends_on", "xenstore"], {}),
    "healthy without healthcheck": (["services", "xenstored", "healthcheck"], None),
    "bad subcommand": (["services", "guest4k", "command", 2], "domian"),
    "bad option": (["services", "guest16k", "command", 3], "--bogus"),
    "bad probe": (["services", "backend", "healthcheck", "test", 3], "nothing"),
    "undeclared volume": (["services", "backend", "volumes", 0], "secrets:/var/lib/xenpv/keys"),
    "undeclared network": (["services", "check", "networks"], ["other"]),
    "wrong key": (["services", "guest64k", "command", 4], "--key-file=/var/lib/xenpv/keys/x.key"),
    "wrong listen port": (["services", "guest4k", "command", 6], "--listen=tcp:0.0.0.0:7200"),
    "wrong xenstore": (["services", "guest4k", "command", 3], "--xenstore=tcp:xenstored:1"),
    "cycle": (["services", "xenstored", "depends_on"], {"check": {}}),
    "guest not --connected": (["services", "guest16k", "healthcheck", "test"], None),
    "no restart after a crash": (["services", "backend", "restart"], "no"),
}


@pytest.mark.parametrize("what", sorted(MUTATIONS))
def test_each_mistake_is_caught(what: str) -> None:
    path, value = MUTATIONS[what]
    doc = _mutate(path, value, delete=value is None)
    if what == "guest not --connected":
        svc = doc["services"]["guest16k"]
        svc["healthcheck"] = copy.deepcopy(load_compose()["services"]["guest16k"]["healthcheck"])
        svc["healthcheck"]["test"].remove("--connected")
    assert compose_problems(doc), what


def test_every_domain_service_command_parses_to_the_domain_runner() -> None:
    doc = load_compose()
    for spec in default_topology().domains:
        args, why = parse_xenpv(as_argv(doc["services"][spec.name]["command"]))
        assert args is not None, why
        assert args.command == "domain" and callable(args.run)


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    instructions = [(line.split()[0].upper(), line.split(None, 1)[1]) for line in lines]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [arg for op, arg in instructions if op == "RUN"]
    assert any("pip install ." in r for r in runs)
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert any("useradd" in r and users[-1] in r for r in runs)
    for op, arg in instructions:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("xenpv", "backends", "frontends", "pyproject.toml"):
        assert needed not in ignored
    # Every mount point of a compose volume exists in the image, owned by the user.
    targets = {
        named_volume(v)[1] for svc in load_compose()["services"].values() for v in svc["volumes"]
    }
    mkdirs = " ".join(r for r in runs if "mkdir" in r)
    assert all(t in mkdirs for t in targets), (targets, mkdirs)
