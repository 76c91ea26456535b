"""Istio's injected pods on two real nodes, with our chart installed from our image.

One cluster for the module (started once, judged by every test): two real nodes, the chart
through ``helm install`` with the image ``scripts/build-images`` built from the Dockerfile, then
20 pods of Istio's own injected Deployments in a namespace that enforces Pod Security
``restricted``, their proxy replaced by a stub that listens where Envoy would and logs what
reached it. The tests read what the API server, the kubelets (logs, through the API server) and
the agents (/metrics, through the API server) say about them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import pytest

from ipnc_dev.realnode import RealCluster, artifacts, install, mesh, workload
from istio_pod_network_controller import names

from .conftest import needs_root, shared_injected, timings

pytestmark = pytest.mark.realnode

NODES = {"node-1", "node-2"}
EXPECTED_PODS = sum(replicas for _, replicas in workload.SOURCES)
INITIALIZED_EVENT = re.compile(
    r"^redirect rules applied and verified: (\d+) rules in network namespace (\d+) "
    r"\((?:\w+ mode, )?(nft|legacy) backend, [\d.]+ ms\)$"
)


@dataclass
class Mesh:
    cluster: RealCluster
    release: install.Release
    chart_pods: list[mesh.PodView]
    pods: list[mesh.PodView]
    service_ip: str
    events: list[dict[str, object]]
    metrics: dict[str, str]
    product_image_id: str


@pytest.fixture(scope="module")
def meshed() -> Iterator[Mesh]:
    needs_root()
    injected = shared_injected()
    t0 = time.monotonic()
    archives = (artifacts.BUSYBOX_ARCHIVE, artifacts.PRODUCT_ARCHIVE, artifacts.STUB_ARCHIVE)
    with RealCluster(nodes=2, image_archives=archives) as cluster:
        assert cluster.images is not None
        release = install.install(cluster)
        t_chart = time.monotonic()
        count = mesh.deploy(cluster, injected)
        t_pods = time.monotonic()
        from lightkube.resources.core_v1 import Service

        with cluster.client() as client:
            service = client.get(Service, workload.SERVICE, namespace=workload.NAMESPACE)
        pods = [
            mesh.read_logs(
                cluster,
                workload.NAMESPACE,
                p,
                [names.WAITER_CONTAINER, workload.ISTIO_PROXY, next(iter(p.containers))],
            )
            for p in mesh.pods(cluster, workload.NAMESPACE)
        ]
        assert len(pods) == count
        yield Mesh(
            cluster=cluster,
            release=release,
            chart_pods=mesh.pods(cluster, release.namespace),
            pods=pods,
            service_ip=service.spec.clusterIP,
            events=mesh.events(cluster, workload.NAMESPACE),
            metrics=mesh.metrics(cluster, release),
            product_image_id=artifacts.config_digest(cluster.images.folder / artifacts.PRODUCT_ARCHIVE),
        )
        t_tests = time.monotonic()
    done = time.monotonic()
    timings.append(
        f"real-node mesh: 2 nodes Ready {cluster.timings['start']:.1f} s, "
        f"chart ready {release.seconds:.1f} s, "
        f"{count} meshed pods Running {t_pods - t_chart:.1f} s, logs and checks {t_tests - t_pods:.1f} s, "
        f"teardown and host check {done - t_tests:.1f} s; {done - t0:.1f} s in all"
    )


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- the chart ---------------------------------------------------------------------------------------


def test_chart_pods_run_from_the_image_built_from_our_dockerfile(meshed: Mesh) -> None:
    agents = [p for p in meshed.chart_pods if p.name.startswith(meshed.release.agent)]
    webhooks = [p for p in meshed.chart_pods if p.name.startswith(meshed.release.webhook)]
    assert {p.node for p in agents} == NODES, "one agent per node"
    assert len(agents) == 2 and len(webhooks) == 2
    for pod in agents + webhooks:
        assert pod.phase == "Running" and pod.ready, pod.name
        (container,) = pod.containers.values()
        # A restarted agent starts its counters again: the metrics test below relies on none.
        assert container.restarts == 0, (pod.name, container)
        assert container.image == meshed.release.image
        # The runtime's image ID is the configuration digest inside the archive buildah wrote.
        assert container.image_id.endswith(meshed.product_image_id), (pod.name, container.image_id)


def test_chart_components_use_their_service_account_tokens(meshed: Mesh) -> None:
    from lightkube.resources.core_v1 import Pod

    with meshed.cluster.client() as client:
        for view in meshed.chart_pods:
            pod = client.get(Pod, view.name, namespace=meshed.release.namespace)
            account = meshed.release.agent if "-agent-" in view.name else meshed.release.webhook
            assert pod.spec.serviceAccountName == account
            projected = [v for v in pod.spec.volumes if v.projected is not None]
            tokens = [s for v in projected for s in v.projected.sources if s.serviceAccountToken is not None]
            assert tokens, f"{view.name} has no ServiceAccount token volume"
    # Only the agent's ServiceAccount may write the mark (the chart's admission policy): every
    # meshed pod carrying one shows the agent used its own token.
    assert all(p.annotations.get(names.STATUS) == names.STATUS_INITIALIZED for p in meshed.pods)


def test_api_server_calls_the_webhook_through_its_service(meshed: Mesh) -> None:
    config = meshed.cluster.kubectl("get", "mutatingwebhookconfiguration", "-o", "json").stdout
    assert f'"name": "{meshed.release.webhook}"' in config and '"url"' not in config
    metrics = meshed.cluster.kubectl("get", "--raw", "/metrics").stdout
    calls = [
        line
        for line in metrics.splitlines()
        if line.startswith("apiserver_admission_webhook_request_total{") and 'code="200"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in calls) >= EXPECTED_PODS
    dials = mesh.metric_value(metrics, "apiserver_egress_dialer_dial_start_total")
    assert dials > 0, "the API server reached the webhook through its egress selector"


# -- the meshed pods ---------------------------------------------------------------------------------


def test_twenty_injected_pods_run_across_both_nodes_in_a_restricted_namespace(meshed: Mesh) -> None:
    ns = meshed.cluster.kubectl(
        "get", "namespace", workload.NAMESPACE, "-o", "jsonpath={.metadata.labels}"
    ).stdout
    assert '"pod-security.kubernetes.io/enforce":"restricted"' in ns
    assert len(meshed.pods) == EXPECTED_PODS == 20
    assert {p.node for p in meshed.pods} == NODES
    for pod in meshed.pods:
        assert pod.phase == "Running" and pod.ready, pod.name
        inits = list(pod.init_containers)
        assert inits[0] == names.WAITER_CONTAINER, (pod.name, inits)
        assert workload.ISTIO_INIT not in inits, pod.name
        assert names.IPTABLES_ARGS in pod.annotations, pod.name


def test_every_application_connection_is_caught_by_its_own_sidecar(meshed: Mesh) -> None:
    for pod in meshed.pods:
        app = next(iter(pod.containers))
        reply = workload.client_reply(pod.logs[app])
        assert reply is not None, f"{pod.name}: the application logged no answer:\n{pod.logs[app]}"
        assert workload.intercepted(reply, pod=pod.name, service_ip=meshed.service_ip), (pod.name, reply)
        assert reply["peer"][0] == pod.ip, (pod.name, reply)
        # The sidecar itself logged that very connection (the reply is not the application's word).
        token = f"{workload.TOKEN_PREFIX}{pod.name}"
        records = [r for r in workload.sidecar_records(pod.logs[workload.ISTIO_PROXY]) if r["token"] == token]
        assert len(records) == 1, (pod.name, pod.logs[workload.ISTIO_PROXY])
        assert records[0]["orig"] == [meshed.service_ip, workload.SERVICE_PORT]
        assert records[0]["uid"] == 1337, "the sidecar runs as the proxy's user"


def test_no_pod_started_before_its_rules_were_verified(meshed: Mesh) -> None:
    for pod in meshed.pods:
        assert pod.annotations.get(names.STATUS) == names.STATUS_INITIALIZED, pod.name
        detail = pod.detail
        waiter = pod.container(names.WAITER_CONTAINER)
        assert waiter.exit_code == 0 and waiter.restarts == 0, (pod.name, waiter)
        log = pod.logs[names.WAITER_CONTAINER]
        assert f"pod initialized for network namespace {detail['netnsInode']}" in log, (pod.name, log)
        assert "outbound redirect proven" in log, (pod.name, log)
        assert waiter.finished_at is not None
        finished = _stamp(waiter.finished_at)
        # Container times have whole seconds: the mark's time, cut to the second, comes first.
        applied = _stamp(detail["appliedAt"]).replace(microsecond=0)
        assert applied <= finished, (pod.name, detail["appliedAt"], waiter.finished_at)
        proxy = pod.container(workload.ISTIO_PROXY)
        app = pod.containers[next(iter(pod.containers))]
        assert proxy.started_at is not None and app.started_at is not None
        assert finished <= _stamp(proxy.started_at) <= _stamp(app.started_at), pod.name


def test_events_metrics_and_status_annotations_are_as_documented(meshed: Mesh) -> None:
    by_uid = {p.uid: p for p in meshed.pods}
    initialized: dict[str, dict[str, object]] = {}
    for event in meshed.events:
        involved = event.get("involvedObject") or {}
        assert isinstance(involved, dict)
        if event.get("reason") == "Initialized" and involved.get("uid") in by_uid:
            initialized[str(involved["uid"])] = event
    assert set(initialized) == set(by_uid), "one Initialized Event per meshed pod"
    for uid, event in initialized.items():
        pod, detail = by_uid[uid], by_uid[uid].detail
        assert event["type"] == "Normal"
        assert event["source"] == {"component": "istio-pod-network-controller", "host": pod.node}
        assert event["reportingInstance"] == pod.node
        match = INITIALIZED_EVENT.match(str(event["message"]))
        assert match, event["message"]
        assert (int(match[1]), int(match[2]), match[3]) == (
            detail["rules"],
            detail["netnsInode"],
            detail["backend"],
        )
        assert detail["node"] == pod.node and detail["rules"] > 0
        assert len(detail["rulesetSha256"]) == 64
    for node in NODES:
        on_node = sum(1 for p in meshed.pods if p.node == node)
        text = meshed.metrics[node]
        assert mesh.metric_value(text, "ipnc_pods_initialized_total") == on_node, node
        assert mesh.metric_value(text, "ipnc_pods_watched") >= on_node, node
        assert mesh.metric_value(text, "controller_runtime_reconcile_total") >= on_node, node
        assert "workqueue_depth" in text
