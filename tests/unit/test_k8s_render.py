"""`xenpv k8s render`: every manifest is valid against the Kubernetes schemas, and the
cluster is wired: every endpoint a domain dials has a Service that selects it, every probe is
a real `xenpv probe` invocation, requests follow the topology (docs/k8s.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from xenpv.cli import build_parser
from xenpv.commands.args import paths_elsewhere
from xenpv.k8s import render, yamlout
from xenpv.k8s.render import ManifestFile, RenderError
from xenpv.toolstack.topology import DEFAULT_TOPOLOGY_TOML, Topology, loads

# The oldest Kubernetes minor still common on kind/k3s and the newest the schemas know.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
MiB = 1 << 20


def many_guests_toml(guests: int) -> str:
    """One backend and `guests` guests with 4/16/64 KiB pages in turn, each a vbd and a vif."""
    parts = ['[[domain]]\nname = "backend"\nrole = "backend"\npage_size = "4K"\nmemory = "64M"\n']
    sizes = ("4K", "16K", "64K")
    for i in range(guests):
        parts.append(
            f'[[domain]]\nname = "guest{i}"\npage_size = "{sizes[i % 3]}"\nmemory = "64M"\n'
        )
    for i in range(guests):
        parts.append(
            f'[[vbd]]\nfrontend = "guest{i}"\nbackend = "backend"\nimage = "g{i}.img"\n'
            'size = "16M"\n'
        )
    for i in range(guests):
        parts.append(
            f'[[vif]]\nfrontend = "guest{i}"\nbackend = "backend"\n'
            f'mac = "00:16:3e:00:{i // 256:02x}:{i % 256:02x}"\n'
        )
    return "\n".join(parts)


TOPOLOGIES = {"demo": DEFAULT_TOPOLOGY_TOML, "64-guests": many_guests_toml(64)}


@pytest.fixture(params=sorted(TOPOLOGIES), scope="module")
def rendered(request: pytest.FixtureRequest) -> tuple[Topology, list[ManifestFile]]:
    text = TOPOLOGIES[request.param]
    topo = loads(text)
    return topo, render.render(topo, text)


def resources(files: list[ManifestFile]) -> list[dict[str, Any]]:
    return [d for f in files if f.name != "kustomization.yaml" for d in f.documents]


def by_kind(files: list[ManifestFile], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in resources(files) if d["kind"] == kind}


def pod_specs(files: list[ManifestFile]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every StatefulSet, Deployment and Job."""
    for doc in resources(files):
        if doc["kind"] in ("StatefulSet", "Deployment", "Job"):
            yield doc, doc["spec"]["template"]


def containers(files: list[ManifestFile]) -> Iterator[dict[str, Any]]:
    for _workload, pod in pod_specs(files):
        yield from pod["spec"].get("initContainers", [])
        yield from pod["spec"]["containers"]


def parse_xenpv(command: list[str]) -> Any:
    """The real argument parser on a container's `xenpv ...` command (exits on a bad one);
    its paths are the container's, so they are checked for form only."""
    assert command[0] == "xenpv", command
    with paths_elsewhere():
        return build_parser().parse_args(command[1:])


def wait_commands(container: dict[str, Any]) -> list[list[str]]:
    """The `xenpv` commands a `sh -c 'for item; do until CMD; ...'` wait step runs."""
    _sh, _c, script, _name, *items = container["command"]
    match = re.search(r"until (xenpv .+?); do", script)
    if match is None:
        return []
    words = match.group(1).split()
    return [[item if w == '"$item"' else w for w in words] for item in items]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(
    rendered: tuple[Topology, list[ManifestFile]], version: str
) -> None:
    _topo, files = rendered
    docs = resources(files)
    assert len(docs) >= 6
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_yaml_reads_back_as_the_rendered_dicts(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    _topo, files = rendered
    for f in files:
        assert list(yaml.safe_load_all(yamlout.dump_all(f.documents))) == f.documents


def test_the_kustomization_lists_every_file_once(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    _topo, files = rendered
    assert files[-1].name == "kustomization.yaml"
    (kustomization,) = files[-1].documents
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["resources"] == [f.name for f in files[:-1]]
    names = [(d["kind"], d["metadata"]["name"]) for d in resources(files)]
    assert len(names) == len(set(names))


def test_one_workload_and_service_per_domain(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    statefulsets, deployments = by_kind(files, "StatefulSet"), by_kind(files, "Deployment")
    assert "xenpv-xenstored" in statefulsets
    store_claims = statefulsets["xenpv-xenstored"]["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in store_claims] == ["store"]
    for spec in topo.domains:
        name = f"xenpv-{spec.name}"
        if spec.role == "backend":
            assert name in statefulsets and name not in deployments
        else:
            assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}
        assert name in by_kind(files, "Service")
    assert len(statefulsets) + len(deployments) == len(topo.domains) + 1
    assert set(by_kind(files, "Job")) == {"xenpv-toolstack", "xenpv-check"}


def _selects(service: dict[str, Any], pod: dict[str, Any], port: int) -> bool:
    """The Service selects the pod and forwards `port` to a named port of its container."""
    labels = pod["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in service["spec"]["selector"].items()):
        return False
    for p in service["spec"]["ports"]:
        if p["port"] != port:
            continue
        named = {cp["name"] for c in pod["spec"]["containers"] for cp in c.get("ports", [])}
        return p["targetPort"] in named
    return False


def test_every_endpoint_a_domain_dials_has_a_service(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    services = by_kind(files, "Service")
    pods = {w["metadata"]["name"]: pod for w, pod in pod_specs(files)}
    # The link endpoints the toolstack publishes (the Job's --endpoint), one per domain.
    apply = parse_xenpv(by_kind(files, "Job")["xenpv-toolstack"]["spec"]["template"]["spec"][
        "containers"
    ][0]["command"])  # fmt: skip
    for spec in topo.domains:
        endpoint = apply.endpoint.replace("{name}", spec.name)
        kind, host, port = endpoint.split(":")
        assert kind == "tcp"
        assert _selects(services[host], pods[f"xenpv-{spec.name}"], int(port)), endpoint
    # Every xenstore address a domain or probe dials over TCP.
    for container in containers(files):
        commands = [container["command"], *wait_commands(container)]
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                commands.append(container[probe]["exec"]["command"])
        for command in commands:
            for arg in command:
                match = re.fullmatch(r"--xenstore=tcp:([^:]+):(\d+)", arg)
                if match and match.group(1) != "127.0.0.1":
                    host, port = match.group(1), int(match.group(2))
                    assert _selects(services[host], pods["xenpv-xenstored"], port), arg


def test_every_probe_is_a_xenpv_probe_command(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    seen = 0
    for container in containers(files):
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                args = parse_xenpv(container[probe]["exec"]["command"])
                assert args.command == "probe"
                seen += 1
        for command in wait_commands(container):
            assert parse_xenpv(command).command == "probe"
            seen += 1
        if container["command"][0] == "xenpv":
            parse_xenpv(container["command"])
    assert seen >= 2 * (len(topo.domains) + 1)


def test_guests_are_ready_once_connected_and_the_check_waits_for_all(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    deployments = by_kind(files, "Deployment")
    for spec in topo.guests:
        pod = deployments[f"xenpv-{spec.name}"]["spec"]["template"]["spec"]
        readiness = parse_xenpv(pod["containers"][0]["readinessProbe"]["exec"]["command"])
        assert (readiness.command, readiness.kind, readiness.name, readiness.connected) == (
            "probe",
            "domain",
            spec.name,
            True,
        )
    check = by_kind(files, "Job")["xenpv-check"]["spec"]["template"]["spec"]
    waited = [parse_xenpv(c).name for c in wait_commands(check["initContainers"][0])]
    assert waited == [g.name for g in topo.guests]


def test_requests_are_sized_from_the_topology(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    pods = {w["metadata"]["name"]: pod for w, pod in pod_specs(files)}
    for spec in topo.domains:
        requests = pods[f"xenpv-{spec.name}"]["spec"]["containers"][0]["resources"]["requests"]
        assert requests["memory"] == f"{(spec.memory + render.RUNTIME_MEMORY) // MiB}Mi"
    backend = by_kind(files, "StatefulSet")["xenpv-backend"]
    (claim,) = backend["spec"]["volumeClaimTemplates"]
    images = sum(v.size for v in topo.vbds)
    assert claim["spec"]["resources"]["requests"]["storage"] == (
        f"{(images + render.IMAGE_HEADROOM) // MiB}Mi"
    )
    cpu = pods["xenpv-backend"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
    assert int(cpu.removesuffix("m")) == 50 + 50 * (len(topo.vbds) + len(topo.vifs))


def test_a_backend_without_images_has_no_volume() -> None:
    text = DEFAULT_TOPOLOGY_TOML.replace(
        '[[domain]]\nname = "guest4k"',
        '[[domain]]\nname = "net"\nrole = "backend"\npage_size = "4K"\nmemory = "32M"\n\n'
        '[[domain]]\nname = "guest4k"',
    ).replace(
        'frontend = "guest4k"\nbackend = "backend"\nmac',
        'frontend = "guest4k"\nbackend = "net"\nmac',
    )
    topo = loads(text)
    assert [v.backend for v in topo.vifs] == ["net", "backend", "backend"]
    net = by_kind(render.render(topo, text), "StatefulSet")["xenpv-net"]
    assert net["spec"]["volumeClaimTemplates"] == []
    mounts = net["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert [m["name"] for m in mounts] == ["shared"]
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(net, version, strict=True)


def test_the_toolstack_applies_the_rendered_topology(
    rendered: tuple[Topology, list[ManifestFile]],
) -> None:
    topo, files = rendered
    configmap = by_kind(files, "ConfigMap")["xenpv-topology"]
    assert loads(configmap["data"]["topology.toml"]) == topo
    job = by_kind(files, "Job")["xenpv-toolstack"]["spec"]["template"]["spec"]
    args = parse_xenpv(job["containers"][0]["command"])
    mounts = {m["mountPath"] for m in job["containers"][0]["volumeMounts"]}
    assert str(args.file.parent) in mounts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('"guest4k"', '"Guest_4k"'), "not a Kubernetes Service name"),
        (('mac = "00:16:3e:00:00:01"', 'mac = "00:16:3e:00:00:01"\ntap = "t0"'), "vif[0].tap"),
        (('image = "guest4k.img"', 'image = "/srv/guest4k.img"'), "vbd[0].image"),
    ],
)
def test_what_cannot_be_rendered_is_named(change: tuple[str, str], message: str) -> None:
    text = DEFAULT_TOPOLOGY_TOML.replace(*change)
    with pytest.raises(RenderError, match=re.escape(message)):
        render.render(loads(text), text)


def xenpv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenpv", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_writes_a_kustomize_base_or_a_stream(tmp_path: Path) -> None:
    result = xenpv("k8s", "render", "-o", str(tmp_path / "base"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "base").iterdir())
    (kustomization,) = yaml.safe_load_all((tmp_path / "base" / "kustomization.yaml").read_text())
    assert sorted([*kustomization["resources"], "kustomization.yaml"]) == written
    stream = xenpv("k8s", "render", "--image", "registry.example/xenpv:1")
    assert stream.returncode == 0, stream.stderr
    docs = list(yaml.safe_load_all(stream.stdout))
    assert {d["kind"] for d in docs} >= {"StatefulSet", "Deployment", "Service", "Job"}
    images = {c["image"] for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {"registry.example/xenpv:1"}


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_TOPOLOGY_TOML.replace('mac = "00:16:3e:00:00:01"', 'mac = "x"'))
    for args in (("k8s", "render", str(tmp_path / "missing.toml")), ("k8s", "render", str(bad))):
        result = xenpv(*args)
        assert result.returncode == 2  # a usage error: a bad file
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("xenpv: error:")
