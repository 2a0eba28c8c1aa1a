"""Kubernetes manifests for a topology: the compose cluster (docs/compose.md) on a cluster.

    files = render(topo, topology_text, Options(image="xenpv:latest"))   # pure
    for f in files: print(f.name, yamlout.dump_all(f.documents))

Rendering is pure: a `Topology` (plus its TOML text, shipped in a ConfigMap for the
toolstack) becomes a list of `ManifestFile`s, each a list of plain dicts; `xenpv k8s render`
writes them with `xenpv.k8s.yamlout`. What is rendered (docs/k8s.md):

- `xenstored`: a StatefulSet (one replica) whose store (`--data-dir`) is on a persistent
  volume, and a headless Service `xenpv-xenstored` on 8766 (authenticated TCP for domains).
- one workload per domain, named `xenpv-<domain>`: a StatefulSet for a backend (its disk
  images on a persistent volume sized from its vbds), a Deployment with the Recreate strategy
  for a guest (two processes must never claim one domid); and a Service `xenpv-<domain>` on
  7100, the link endpoint the toolstack publishes for it (`tcp:xenpv-<domain>:7100`).
- readiness and liveness probes that run `xenpv probe` (as the compose healthchecks do).
- the toolstack (`xenpv toolstack apply`, idempotent) and the self-test (`xenpv toolstack
  check`) as Jobs; they speak to xenstored as dom0 over its Unix socket, so they share a
  volume with it and are scheduled on its node (a Unix socket does not cross nodes).
- resource requests from the topology: a domain's memory plus the runtime's, CPU by devices.
- `kustomization.yaml`, a Kustomize base to overlay (namespace, image, storage class, ...).

The shared volume (`xenpv-shared`: dom0's socket and the key files) is ReadWriteOnce, so in
the base every pod that mounts it is placed on xenstored's node; docs/k8s.md shows the
overlay for a multi-node cluster.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from xenpv.errors import UsageError
from xenpv.toolstack.topology import DomainSpec, Topology

MiB = 1 << 20
XENSTORED_PORT = 8766  # as in docker-compose.yml
LINK_PORT = 7100
UID = 10001  # the image's user (Dockerfile)
SHARED = "/var/lib/xenpv/shared"  # dom0's socket and the keys (the xenpv-shared claim)
SOCKET = f"{SHARED}/xenstored.sock"
KEYS = f"{SHARED}/keys"
STORE = "/var/lib/xenpv/store"
IMAGES = "/var/lib/xenpv/images"
TOPOLOGY_DIR = "/etc/xenpv"
PREFIX = "xenpv-"
APP = "xenpv"

# Memory a domain process needs beyond its guest memory (Python, trio, the drivers): the
# compose containers of the demo use 60-100 MiB resident besides their 64 MiB memfd.
RUNTIME_MEMORY = 128 * MiB
MEMORY_LIMIT_HEADROOM = 256 * MiB
IMAGE_HEADROOM = 64 * MiB
SHARED_SIZE = 16 * MiB

# Kubernetes Service names are DNS-1035 labels.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABEL_MAX = 63


class RenderError(UsageError):
    """The topology cannot be rendered for Kubernetes (the message says which part, why)."""


DEFAULT_IMAGE = "xenpv:latest"


@dataclass(frozen=True, slots=True)
class Options:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    storage_class: str | None = None  # None: the cluster's default class
    block_bytes: int = 1 << 20  # the check Job's self-test round, as in docker-compose.yml
    frames: int = 8


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of the base: a name relative to the output directory and its documents."""

    name: str
    documents: list[dict[str, Any]] = field(default_factory=list)


def object_name(domain: str) -> str:
    """The Service/workload name of a domain; its link endpoint is `tcp:<this>:7100`."""
    return PREFIX + domain


def endpoint_template() -> str:
    return f"tcp:{PREFIX}{{name}}:{LINK_PORT}"


def _mebibytes(n: int) -> str:
    return f"{-(-n // MiB)}Mi"


def _labels(component: str, domain: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    if domain is not None:
        labels["xenpv.io/domain"] = domain
    return labels


def _selector(component: str, domain: str | None = None) -> dict[str, str]:
    selector = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    if domain is not None:
        selector["xenpv.io/domain"] = domain
    return selector


def _metadata(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": labels}


def _on_xenstored_node() -> dict[str, Any]:
    """Required co-location with xenstored: the Unix socket and the RWO volume are there."""
    return {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": _selector("xenstored")},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }


def _security() -> dict[str, Any]:
    return {"runAsUser": UID, "runAsGroup": UID, "runAsNonRoot": True, "fsGroup": UID}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _claim(name: str, size: int, opts: Options) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": _mebibytes(size)}},
    }
    if opts.storage_class is not None:
        spec["storageClassName"] = opts.storage_class
    return {"metadata": {"name": name}, "spec": spec}


def _exec_probe(command: list[str], *, period: int, failures: int) -> dict[str, Any]:
    # `xenpv probe` bounds itself with --timeout 5; the kubelet's timeout is above it.
    return {
        "exec": {"command": command},
        "periodSeconds": period,
        "timeoutSeconds": 10,
        "failureThreshold": failures,
    }


def _wait_script(command: list[str]) -> list[str]:
    """`sh -c` retrying `command` (with "$1".. filled from the extra arguments) until it
    succeeds, for every remaining argument: the Jobs' and domains' wait-for steps."""
    quoted = " ".join(a if a == '"$item"' else shlex.quote(a) for a in command)
    return ["sh", "-c", f"for item; do until {quoted}; do sleep 2; done; done", "sh"]


def xenstored_probe() -> list[str]:
    return [
        "xenpv",
        "probe",
        "xenstored",
        f"--xenstore=unix:{SOCKET}",
        f"--xenstore=tcp:127.0.0.1:{XENSTORED_PORT}",
    ]


def domain_probe(name: str, *, connected: bool) -> list[str]:
    command = [
        "xenpv",
        "probe",
        "domain",
        name,
        f"--xenstore=tcp:{PREFIX}xenstored:{XENSTORED_PORT}",
        f"--key-file={KEYS}/{name}.key",
    ]
    return [*command, "--connected"] if connected else command


def check_wait_probe() -> list[str]:
    """What the check Job waits for, per guest (as dom0, over the Unix socket)."""
    return ["xenpv", "probe", "domain", '"$item"', f"--xenstore=unix:{SOCKET}", "--connected"]


def _validate(topo: Topology) -> None:
    for i, spec in enumerate(topo.domains):
        name = object_name(spec.name)
        if not _DNS_LABEL.match(name) or len(name) > _DNS_LABEL_MAX:
            raise RenderError(
                f"domain[{i}].name {spec.name!r}: {name!r} is not a Kubernetes Service name"
                f" (lowercase letters, digits and '-', at most {_DNS_LABEL_MAX} characters)"
            )
    if object_name("xenstored") in {object_name(d.name) for d in topo.domains}:
        raise RenderError("a domain named 'xenstored' would clash with xenstored's Service")
    for i, vbd in enumerate(topo.vbds):
        if vbd.image is not None and vbd.image.startswith("/"):
            raise RenderError(
                f"vbd[{i}].image {vbd.image!r}: absolute paths do not exist in the backend's"
                " pod; give a path relative to its images volume"
            )
    for i, vif in enumerate(topo.vifs):
        if vif.tap is not None:
            raise RenderError(f"vif[{i}].tap: TAP devices are not rendered for Kubernetes")


def _ends(topo: Topology) -> list[tuple[str, str]]:
    """(frontend, backend) of every device."""
    return [(v.frontend, v.backend) for v in topo.vbds] + [
        (v.frontend, v.backend) for v in topo.vifs
    ]


def _devices_of(topo: Topology, name: str) -> tuple[int, int]:
    """(devices it is the frontend of, devices it is the backend of)."""
    ends = _ends(topo)
    return sum(1 for f, _ in ends if f == name), sum(1 for _, b in ends if b == name)


def domain_resources(topo: Topology, spec: DomainSpec) -> dict[str, Any]:
    """Requests sized from the topology: memory = guest memory + the runtime's; CPU grows
    with the devices the domain serves (a backend copies every guest's I/O)."""
    front, back = _devices_of(topo, spec.name)
    cpu = 50 + 25 * front + 50 * back
    return {
        "requests": {"cpu": f"{cpu}m", "memory": _mebibytes(spec.memory + RUNTIME_MEMORY)},
        "limits": {"memory": _mebibytes(spec.memory + RUNTIME_MEMORY + MEMORY_LIMIT_HEADROOM)},
    }


def image_bytes(topo: Topology, backend: str) -> int:
    """The images volume a backend needs: its file-backed vbds plus headroom."""
    return IMAGE_HEADROOM + sum(
        v.size for v in topo.vbds if v.backend == backend and v.image is not None
    )


def _topology_configmap(text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{PREFIX}topology", _labels("toolstack")),
        "data": {"topology.toml": text},
    }


def _shared_claim(opts: Options) -> dict[str, Any]:
    claim = _claim(f"{PREFIX}shared", SHARED_SIZE, opts)
    claim["metadata"]["labels"] = _labels("xenstored")
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim}


def _shared_volume(read_only: bool) -> dict[str, Any]:
    return {
        "name": "shared",
        "persistentVolumeClaim": {"claimName": f"{PREFIX}shared", "readOnly": read_only},
    }


def _xenstored(topo: Topology, opts: Options) -> list[dict[str, Any]]:
    name = f"{PREFIX}xenstored"
    domains = len(topo.domains)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, _labels("xenstored")),
        "spec": {
            "clusterIP": "None",
            "selector": _selector("xenstored"),
            "ports": [{"name": "xenstore", "port": XENSTORED_PORT, "targetPort": "xenstore"}],
        },
    }
    container = {
        "name": "xenstored",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": [
            "xenpv",
            "--log-format=json",
            "xenstored",
            f"--socket={SOCKET}",
            f"--data-dir={STORE}",
            f"--tcp=0.0.0.0:{XENSTORED_PORT}",
        ],
        "ports": [{"name": "xenstore", "containerPort": XENSTORED_PORT}],
        "readinessProbe": _exec_probe(xenstored_probe(), period=5, failures=3),
        "livenessProbe": _exec_probe(xenstored_probe(), period=10, failures=6),
        "resources": {
            "requests": {"cpu": f"{100 + 10 * domains}m", "memory": _mebibytes(96 * MiB)},
            "limits": {"memory": _mebibytes(256 * MiB + domains * MiB)},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "store", "mountPath": STORE},
            {"name": "shared", "mountPath": SHARED},
        ],
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(name, _labels("xenstored")),
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": _selector("xenstored")},
            "template": {
                "metadata": {"labels": _labels("xenstored")},
                "spec": {
                    "securityContext": _security(),
                    "containers": [container],
                    "volumes": [_shared_volume(read_only=False)],
                },
            },
            "volumeClaimTemplates": [_claim("store", 256 * MiB + domains * MiB, opts)],
        },
    }
    return [service, statefulset]


def _domain(topo: Topology, spec: DomainSpec, opts: Options) -> list[dict[str, Any]]:
    name = object_name(spec.name)
    labels = _labels("domain", spec.name)
    selector = _selector("domain", spec.name)
    key_file = f"{KEYS}/{spec.name}.key"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, labels),
        "spec": {
            "selector": selector,
            "ports": [{"name": "link", "port": LINK_PORT, "targetPort": "link"}],
        },
    }
    is_backend = spec.role == "backend"
    # Only a backend with file-backed vbds keeps anything: its images volume.
    has_images = any(v.backend == spec.name and v.image is not None for v in topo.vbds)
    mounts: list[dict[str, Any]] = [{"name": "shared", "mountPath": SHARED, "readOnly": True}]
    if has_images:
        mounts.append({"name": "images", "mountPath": IMAGES})
    container = {
        "name": "domain",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": [
            "xenpv",
            "--log-format=json",
            "domain",
            f"--xenstore=tcp:{PREFIX}xenstored:{XENSTORED_PORT}",
            f"--key-file={key_file}",
            "--transport=socket",
            f"--listen=tcp:0.0.0.0:{LINK_PORT}",
        ],
        "ports": [{"name": "link", "containerPort": LINK_PORT}],
        # Ready: a guest once every device is Connected, a backend once its process is.
        "readinessProbe": _exec_probe(
            domain_probe(spec.name, connected=not is_backend), period=5, failures=3
        ),
        # Alive: the domain is known and its process answers for it (not Connected: a
        # backend's restart must not cascade into restarting its guests).
        "livenessProbe": _exec_probe(
            domain_probe(spec.name, connected=False), period=10, failures=6
        )
        | {"initialDelaySeconds": 10},
        "resources": domain_resources(topo, spec),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    wait_for_key = {
        "name": "wait-for-key",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["sh", "-c", 'until [ -s "$1" ]; do sleep 1; done', "sh", key_file],
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "shared", "mountPath": SHARED, "readOnly": True}],
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "securityContext": _security(),
            "affinity": _on_xenstored_node(),
            "terminationGracePeriodSeconds": 15,
            "initContainers": [wait_for_key],
            "containers": [container],
            "volumes": [_shared_volume(read_only=True)],
        },
    }
    workload: dict[str, Any]
    if is_backend:
        workload = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _metadata(name, labels),
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": selector},
                "template": pod,
                "volumeClaimTemplates": (
                    [_claim("images", image_bytes(topo, spec.name), opts)] if has_images else []
                ),
            },
        }
    else:
        workload = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _metadata(name, labels),
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector},
                "template": pod,
            },
        }
    return [service, workload]


def _job(
    name: str,
    component: str,
    command: list[str],
    wait: dict[str, Any],
    opts: Options,
    *,
    retries: int,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [_shared_volume(read_only=False)]
    mounts: list[dict[str, Any]] = [{"name": "shared", "mountPath": SHARED}]
    if component == "toolstack":
        volumes.append({"name": "topology", "configMap": {"name": f"{PREFIX}topology"}})
        mounts.append({"name": "topology", "mountPath": TOPOLOGY_DIR, "readOnly": True})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, _labels(component)),
        "spec": {
            "backoffLimit": retries,
            "template": {
                "metadata": {"labels": _labels(component)},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": _security(),
                    "affinity": _on_xenstored_node(),
                    "initContainers": [wait],
                    "containers": [
                        {
                            "name": component,
                            "image": opts.image,
                            "imagePullPolicy": opts.image_pull_policy,
                            "command": command,
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "256Mi"},
                            },
                            "securityContext": _container_security(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


def _wait_container(
    name: str, command: list[str], items: list[str], opts: Options
) -> dict[str, Any]:
    return {
        "name": name,
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": [*_wait_script(command), *items],
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}],
    }


def apply_command() -> list[str]:
    return [
        "xenpv",
        "--log-format=json",
        "toolstack",
        "apply",
        f"{TOPOLOGY_DIR}/topology.toml",
        f"--xenstore=unix:{SOCKET}",
        f"--keys-dir={KEYS}",
        f"--image-dir={IMAGES}",
        f"--endpoint={endpoint_template()}",
    ]


def check_command(opts: Options) -> list[str]:
    return [
        "xenpv",
        "--log-format=json",
        "toolstack",
        "check",
        f"--xenstore=unix:{SOCKET}",
        f"--block-bytes={opts.block_bytes}",
        f"--frames={opts.frames}",
        "--json",
    ]


def _jobs(topo: Topology, opts: Options) -> list[ManifestFile]:
    # The toolstack waits for xenstored (one item: the probe takes no per-item argument).
    toolstack = _job(
        f"{PREFIX}toolstack",
        "toolstack",
        apply_command(),
        _wait_container("wait-for-xenstored", xenstored_probe(), ["xenstored"], opts),
        opts,
        retries=4,  # idempotent: a retry after a partial failure is safe
    )
    frontends = {f for f, _ in _ends(topo)}
    guests = [d.name for d in topo.domains if d.name in frontends]
    check = _job(
        f"{PREFIX}check",
        "check",
        check_command(opts),
        _wait_container("wait-for-guests", check_wait_probe(), guests, opts),
        opts,
        retries=0,  # a failed self-test is the answer, not something to retry
    )
    return [
        ManifestFile("toolstack-job.yaml", [toolstack]),
        ManifestFile("check-job.yaml", [check]),
    ]


def kustomization(files: list[ManifestFile]) -> dict[str, Any]:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "labels": [{"pairs": {"app.kubernetes.io/part-of": APP}, "includeSelectors": False}],
        "resources": [f.name for f in files],
    }


def render(topo: Topology, topology_text: str, opts: Options | None = None) -> list[ManifestFile]:
    """Every file of the Kustomize base for `topo` (pure); `topology_text` is the TOML the
    toolstack Job applies (it must parse to `topo`). The last file is kustomization.yaml."""
    opts = opts or Options()
    _validate(topo)
    files = [
        ManifestFile(
            "xenstored.yaml",
            [_topology_configmap(topology_text), _shared_claim(opts), *_xenstored(topo, opts)],
        ),
        *(
            ManifestFile(f"domain-{spec.name}.yaml", _domain(topo, spec, opts))
            for spec in topo.domains
        ),
        *_jobs(topo, opts),
    ]
    return [*files, ManifestFile("kustomization.yaml", [kustomization(files)])]
