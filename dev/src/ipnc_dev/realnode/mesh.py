"""Istio-injected workloads on a real cluster with the chart installed: deploy them, wait until
they run, and read back everything a test judges them by.

``deploy`` applies ``workload``'s namespace and Deployments once the API server calls the webhook
(a server-side dry run comes back with the waiter), and waits, bounded, until every pod is Running
and Ready. ``observe`` gathers, per pod, the agent's mark (status and detail annotations), the
waiter's exit and log, when each container started, the application's and the sidecar's logs, and
for the namespace the Events; logs come through the API server (and its egress relay to the
kubelets), as ``kubectl logs`` gets them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from istio_pod_network_controller import names

from . import workload
from .install import Release, describe
from .processes import wait_until

if TYPE_CHECKING:
    from .cluster import RealCluster

WEBHOOK_TIMEOUT = 60.0
RUNNING_TIMEOUT = 360.0


class MeshError(RuntimeError):
    """The workload did not come up; the message shows pods and Events."""


@dataclass(frozen=True)
class Container:
    name: str
    image: str
    image_id: str
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    ready: bool
    restarts: int


@dataclass(frozen=True)
class PodView:
    """One pod as the API server and its logs show it."""

    name: str
    uid: str
    node: str
    ip: str
    phase: str
    ready: bool
    annotations: Mapping[str, str]
    init_containers: Mapping[str, Container]
    containers: Mapping[str, Container]
    logs: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False

    @property
    def detail(self) -> dict[str, Any]:
        try:
            parsed = json.loads(self.annotations.get(names.DETAIL, "{}"))
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    def container(self, name: str) -> Container:
        found = self.init_containers.get(name) or self.containers.get(name)
        if found is None:
            raise KeyError(f"{self.name} has no container {name}")
        return found


def _containers(statuses: Sequence[Any] | None) -> dict[str, Container]:
    out: dict[str, Container] = {}
    for s in statuses or []:
        state = s.state
        running = state.running if state else None
        terminated = state.terminated if state else None
        started = running.startedAt if running else (terminated.startedAt if terminated else None)
        out[s.name] = Container(
            name=s.name,
            image=s.image,
            image_id=s.imageID,
            started_at=_stamp(started),
            finished_at=_stamp(terminated.finishedAt) if terminated else None,
            exit_code=terminated.exitCode if terminated else None,
            ready=bool(s.ready),
            restarts=s.restartCount or 0,
        )
    return out


def _stamp(value: Any) -> str | None:
    """Container timestamps as RFC 3339 text (lightkube gives datetimes)."""
    if value is None:
        return None
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def view(pod: Any) -> PodView:
    meta, spec, status = pod.metadata, pod.spec, pod.status
    conditions = (status.conditions if status else None) or []
    return PodView(
        name=meta.name,
        uid=meta.uid,
        node=(spec.nodeName if spec else None) or "",
        ip=(status.podIP if status else None) or "",
        phase=(status.phase if status else None) or "",
        ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
        annotations=dict(meta.annotations or {}),
        init_containers=_containers(status.initContainerStatuses if status else None),
        containers=_containers(status.containerStatuses if status else None),
        deleting=meta.deletionTimestamp is not None,
    )


def pods(cluster: RealCluster, namespace: str, *, labels: Mapping[str, str] | None = None) -> list[PodView]:
    from lightkube.resources.core_v1 import Pod

    with cluster.client() as client:
        return sorted(
            (view(p) for p in client.list(Pod, namespace=namespace, labels=dict(labels or {}))),
            key=lambda v: v.name,
        )


def deploy(
    cluster: RealCluster,
    injected_dir: Path,
    *,
    namespace: str = workload.NAMESPACE,
    sources: Sequence[tuple[str, int]] = workload.SOURCES,
) -> int:
    """Namespace, CA ConfigMap, Service, then Istio's Deployments (``sources``: file and replicas)
    once the webhook answers; waits until every pod runs. Returns the number of pods."""
    from lightkube import ApiError
    from lightkube.resources.core_v1 import Pod

    cp = cluster.control_plane
    assert cluster.images is not None and cp is not None and cp.certs is not None
    ca_pem = cp.certs.ca_cert.read_text()
    cluster.kubectl("apply", "-f", "-", input=_dump(workload.namespace_objects(ca_pem, namespace=namespace)))
    cluster.wait_service_account(namespace)

    def mutated() -> bool:
        with cluster.client() as client:
            probe = cast(Pod, Pod.from_dict(workload.webhook_probe(namespace)))
            try:
                created = client.create(probe).to_dict()
            except ApiError:
                # failurePolicy Fail while the webhook's Service is not routed yet (kube-proxy has
                # not synced it, or its endpoint is not ready): the API server refuses the pod.
                return False
            client.delete(Pod, created["metadata"]["name"], namespace=namespace, grace_period=0)
        inits = [c.get("name") for c in (created.get("spec") or {}).get("initContainers") or []]
        return names.WAITER_CONTAINER in inits

    if not wait_until(mutated, WEBHOOK_TIMEOUT, interval=0.5):
        raise MeshError(f"the API server did not call the webhook within {WEBHOOK_TIMEOUT:g} s")

    images = workload.Images(app=cluster.images.busybox, proxy=cluster.images.stub)
    deployments = [
        workload.runnable(
            workload.load(injected_dir / source), images=images, replicas=replicas, namespace=namespace
        )
        for source, replicas in sources
    ]
    cluster.kubectl("apply", "-f", "-", input=_dump(deployments))
    expected = sum(replicas for _, replicas in sources)
    wait_running(cluster, namespace, expected)
    return expected


def wait_running(
    cluster: RealCluster, namespace: str, expected: int, timeout: float = RUNNING_TIMEOUT
) -> None:
    """Until exactly ``expected`` pods are in ``namespace``, all Running and Ready, none deleting."""

    def all_running() -> bool:
        found = pods(cluster, namespace)
        settled = all(p.phase == "Running" and p.ready and not p.deleting for p in found)
        return len(found) == expected and settled

    if not wait_until(all_running, timeout, interval=1.0):
        raise MeshError(
            f"{expected} pods not Running and Ready in {timeout:g} s:\n{describe(cluster, namespace)}"
        )


def read_logs(cluster: RealCluster, namespace: str, pod: PodView, containers: Sequence[str]) -> PodView:
    """``pod`` with the logs of ``containers`` (through the API server and the kubelet)."""
    out: dict[str, str] = {}
    with cluster.client() as client:
        for name in containers:
            out[name] = "".join(client.log(pod.name, namespace=namespace, container=name))
    return PodView(**{**pod.__dict__, "logs": out})


def events(cluster: RealCluster, namespace: str) -> list[dict[str, Any]]:
    done = cluster.kubectl("-n", namespace, "get", "events", "-o", "json")
    items: list[dict[str, Any]] = json.loads(done.stdout).get("items", [])
    return items


def metrics(cluster: RealCluster, release: Release) -> dict[str, str]:
    """Each agent's /metrics, by node, through the API server's pod proxy."""
    out: dict[str, str] = {}
    for agent in pods(cluster, release.namespace, labels={"app.kubernetes.io/component": "agent"}):
        path = f"/api/v1/namespaces/{release.namespace}/pods/{agent.name}:15300/proxy/metrics"
        out[agent.node] = cluster.kubectl("get", "--raw", path).stdout
    return out


def metric_value(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (any labels) in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _dump(objects: Sequence[Mapping[str, Any]]) -> str:
    import yaml

    return "".join("---\n" + yaml.safe_dump(dict(o), sort_keys=False) for o in objects)
