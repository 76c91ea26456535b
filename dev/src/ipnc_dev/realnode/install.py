"""The chart on a real cluster, as a user installs it: ``helm install`` from this checkout, with
the image ``scripts/build-images`` built from the Dockerfile.

What differs from docs/install.md is only where the image comes from: every node has it imported
under ``localhost/istio-pod-network-controller:dev``, so the chart's ``image.*`` point there with
``pullPolicy: Never`` (and the waiter's too). The agent DaemonSet and the webhook Deployment then
run from it under their chart ServiceAccounts (tokens from the kubelet), the API server calls the
webhook through its Service, and the mark protection policy is on, as in production.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import chart
from .processes import wait_until

if TYPE_CHECKING:
    from .cluster import RealCluster

NAMESPACE = "istio-pod-network-controller"
RELEASE = "istio-pod-network-controller"
ROLLOUT_TIMEOUT = 240.0


class InstallError(RuntimeError):
    """The chart did not come up; the message shows the pods and their Events."""


@dataclass(frozen=True)
class Release(chart.ChartAccounts):
    """The installed release: its ServiceAccounts' names (from ``chart.ChartAccounts``), the image
    its pods run and how long the install took."""

    image: str
    seconds: float


def split_image(image: str) -> tuple[str, str]:
    """``repository:tag`` -> (repository, tag); a tag is after the last ``:`` that follows the
    last ``/`` (a registry's port is not a tag)."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon <= slash:
        raise ValueError(f"image {image!r} has no tag")
    return image[:colon], image[colon + 1 :]


def image_values(image: str) -> dict[str, str | int | bool]:
    """Chart values that run the agent, the webhook and the waiter from ``image``, never pulled."""
    repository, tag = split_image(image)
    return {
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "waiter.image.pullPolicy": "Never",
    }


def namespace_manifest(namespace: str) -> dict[str, Any]:
    """The release namespace at Pod Security ``privileged`` (the agent is), as docs/install.md's
    first step makes it."""
    levels = {f"pod-security.kubernetes.io/{mode}": "privileged" for mode in ("enforce", "audit", "warn")}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": levels}}


def install(
    cluster: RealCluster,
    *,
    namespace: str = NAMESPACE,
    values: Mapping[str, str | int | bool] | None = None,
    timeout: float = ROLLOUT_TIMEOUT,
) -> Release:
    """``helm install`` the chart from this checkout and wait until every agent (one per node)
    and every webhook replica is ready."""
    assert cluster.images is not None
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=chart.dump([namespace_manifest(namespace)]))
    settings = {**image_values(cluster.images.product), **(values or {})}
    chart.helm(
        "install", RELEASE, str(chart.chart_dir()), "-n", namespace, *chart.set_args(settings),
        kubeconfig=cluster.kubeconfig_path, env=cluster.helm_env(), timeout=120,
    )  # fmt: skip
    fullname = str(settings.get("fullnameOverride") or chart.CHART_NAME)
    release = Release(namespace, fullname, cluster.images.product, 0.0)
    wait_rollout(cluster, release, nodes=len(cluster.nodes), timeout=timeout)
    return Release(namespace, fullname, cluster.images.product, time.monotonic() - t0)


def wait_rollout(cluster: RealCluster, release: Release, *, nodes: int, timeout: float) -> None:
    from lightkube.resources.apps_v1 import DaemonSet, Deployment

    def ready() -> bool:
        with cluster.client() as client:
            ds = client.get(DaemonSet, release.agent, namespace=release.namespace)
            dep = client.get(Deployment, release.webhook, namespace=release.namespace)
        agents = ds.status.numberReady if ds.status else 0
        wanted = (dep.spec.replicas if dep.spec else None) or 1
        webhooks = (dep.status.availableReplicas if dep.status else None) or 0
        return agents == nodes and webhooks >= wanted

    if not wait_until(ready, timeout, interval=0.5):
        raise InstallError(
            f"the chart's pods were not ready in {timeout:g} s:\n{describe(cluster, release.namespace)}"
        )


def describe(cluster: RealCluster, namespace: str) -> str:
    """Pods and Events of ``namespace``, for a failure message."""
    parts = []
    for args in (("get", "pods", "-o", "wide"), ("get", "events", "--sort-by=.lastTimestamp")):
        done = cluster.kubectl("-n", namespace, *args, check=False)
        parts.append((done.stdout + done.stderr).strip()[-4000:])
    return "\n".join(parts)


def upgrade(
    cluster: RealCluster,
    release: Release,
    values: Mapping[str, str | int | bool],
) -> None:
    """``helm upgrade`` the release with ``values`` over the image's (does not wait: the caller
    decides what happens during the rollout, then calls ``wait_rolled_out``)."""
    settings = {**image_values(release.image), **values}
    if release.fullname != chart.CHART_NAME:
        settings.setdefault("fullnameOverride", release.fullname)
    chart.helm(
        "upgrade", RELEASE, str(chart.chart_dir()), "-n", release.namespace, *chart.set_args(settings),
        kubeconfig=cluster.kubeconfig_path, env=cluster.helm_env(), timeout=120,
    )  # fmt: skip


def wait_rolled_out(cluster: RealCluster, release: Release, *, timeout: float = ROLLOUT_TIMEOUT) -> None:
    """Until the agent DaemonSet and the webhook Deployment run their current template only: every
    pod updated and ready, none of an older revision left."""
    from lightkube.resources.apps_v1 import DaemonSet, Deployment

    nodes = len(cluster.nodes)

    def done() -> bool:
        with cluster.client() as client:
            ds = client.get(DaemonSet, release.agent, namespace=release.namespace)
            dep = client.get(Deployment, release.webhook, namespace=release.namespace)
        d, w = ds.status, dep.status
        if d is None or w is None or ds.metadata is None or dep.metadata is None:
            return False
        wanted = (dep.spec.replicas if dep.spec else None) or 1
        return (
            d.observedGeneration == ds.metadata.generation
            and d.updatedNumberScheduled == nodes
            and d.numberReady == nodes
            and d.currentNumberScheduled == nodes
            and w.observedGeneration == dep.metadata.generation
            and w.updatedReplicas == wanted
            and w.availableReplicas == wanted
            and (w.replicas or 0) == wanted
        )

    if not wait_until(done, timeout, interval=0.5):
        raise InstallError(
            f"the chart's upgrade did not roll out in {timeout:g} s:\n{describe(cluster, release.namespace)}"
        )


@dataclass(frozen=True)
class Installed:
    """What the release put in the cluster (``helm get manifest``) and on the nodes (the UIDs of
    its pods, whose folders the kubelets keep), recorded before an uninstall to check after it."""

    objects: tuple[tuple[str, str, str], ...]  # (kind, namespace or "", name)
    pod_uids: tuple[str, ...]


def installed(cluster: RealCluster, release: Release) -> Installed:
    from lightkube.resources.core_v1 import Pod

    manifest = chart.helm(
        "get", "manifest", RELEASE, "-n", release.namespace,
        kubeconfig=cluster.kubeconfig_path, env=cluster.helm_env(),
    ).stdout  # fmt: skip
    objects = tuple(
        (
            str(o["kind"]),
            str(o.get("metadata", {}).get("namespace") or ""),
            str(o["metadata"]["name"]),
        )
        for o in chart.parse(manifest)
    )
    with cluster.client() as client:
        listed = client.list(Pod, namespace=release.namespace)
        uids = tuple(p.metadata.uid for p in listed if p.metadata and p.metadata.uid)
    return Installed(objects, uids)


def uninstall(cluster: RealCluster, release: Release, *, timeout: float = ROLLOUT_TIMEOUT) -> None:
    """``helm uninstall --wait``, then the release namespace (install() made it) and wait until
    it is gone, with every pod of the chart."""
    chart.helm(
        "uninstall", RELEASE, "-n", release.namespace, "--wait", f"--timeout={int(timeout)}s",
        kubeconfig=cluster.kubeconfig_path, env=cluster.helm_env(), timeout=timeout + 30,
    )  # fmt: skip
    cluster.kubectl("delete", "namespace", release.namespace, "--wait=false")

    def gone() -> bool:
        done = cluster.kubectl("get", "namespace", release.namespace, check=False)
        return done.returncode != 0 and "NotFound" in done.stderr

    if not wait_until(gone, timeout, interval=0.5):
        raise InstallError(
            f"namespace {release.namespace} still there {timeout:g} s after helm uninstall:\n"
            f"{describe(cluster, release.namespace)}"
        )


def leftovers(cluster: RealCluster, release: Release, before: Installed) -> list[str]:
    """What of the release is still there after ``uninstall``, one line each: objects of its
    manifest (the webhook configuration, the mark policy and its binding, RBAC, ...) and its
    namespace in the API; on the nodes, a process running our image's program and a kubelet pod
    folder of one of its pods (where its emptyDir volumes lived; its one hostPath, /proc, is
    mounted read-only)."""
    found: list[str] = []
    for kind, namespace, name in before.objects:
        args = ["get", kind, name, "-o", "name", *(["-n", namespace] if namespace else [])]
        done = cluster.kubectl(*args, check=False)
        if done.returncode == 0:
            found.append(f"{kind} {namespace + '/' if namespace else ''}{name} is still in the API")
        elif "NotFound" not in done.stderr:
            found.append(f"cannot tell whether {kind} {name} is gone: {done.stderr.strip()}")
    ns = cluster.kubectl("get", "namespace", release.namespace, check=False)
    if ns.returncode == 0:
        found.append(f"namespace {release.namespace} is still in the API")
    for node in cluster.nodes:
        for pid, cmdline in cluster.node_processes(node).items():
            if chart.CHART_NAME in cmdline:
                found.append(f"{node.name}: process {pid} still runs {cmdline!r}")
        pods_dir = node.plan.dir / "kubelet" / "pods"
        for uid in before.pod_uids:
            if (pods_dir / uid).exists():
                found.append(f"{node.name}: the kubelet still has {pods_dir / uid}")
    return found
