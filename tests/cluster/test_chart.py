"""The Helm chart, rendered by the real helm and applied to the real API server (issue 7).

1. The announcement's command, for both distributions, applied with kubectl: every object is
   accepted (OpenShift: after registering OpenShift's SecurityContextConstraints CRD).
2. An RBAC matrix checked with SubjectAccessReviews against the applied chart, and a real token of
   the agent's ServiceAccount (the helper the agent tests use) doing its job and nothing more.
3. The webhook's scope, as the API server applies it: which pods it sends to the webhook.
4. ``helm lint`` is clean; the schema rejects bad values with a message naming key and value.

The session's control plane is shared with other tests, so no MutatingWebhookConfiguration with
failurePolicy Fail, and no mark policy (which refuses other tests' agents), outlives the test that
applied it. What the mark policy admits and refuses is shown in test_mark_policy.py.
"""

from __future__ import annotations

import base64
import datetime
import importlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import Container, ObjectReference, PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret
from lightkube.types import PatchType

from ipnc_dev import binaries, chart
from ipnc_dev.controlplane import ControlPlane
from istio_pod_network_controller import names

pytestmark = pytest.mark.cluster

RELEASE_NS = "istio-pod-network-controller"
CHART_ARG = "./chart/istio-pod-network-controller"
AGENT_SA = "istio-pod-network-controller-agent"
WEBHOOK_SA = "istio-pod-network-controller-webhook"
SCC_NAME = "istio-pod-network-controller-agent"
# Named to sort after Istio's injector (istio-sidecar-injector*): see docs/waiter-and-webhook.md.
MWC_NAME = "zz-istio-pod-network-controller"
MARK_POLICY = "istio-pod-network-controller-mark"


def announcement_argv(distribution: str) -> list[str]:
    """The announcement's command, word for word (helm from the test binaries)."""
    return [
        str(binaries.find("helm")),
        "template",
        "-n",
        RELEASE_NS,
        "--set",
        f"kubernetesDistribution={distribution}",
        CHART_ARG,
    ]


def render_announcement(distribution: str) -> str:
    result = subprocess.run(  # noqa: S603 - argument list
        announcement_argv(distribution),
        cwd=chart.repo_root(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


# --------------------------------------------------------------------------------------------
# 1. the announcement's command, applied


SCC_CRD = "securitycontextconstraints.security.openshift.io"


def register_scc_crd(control_plane: ControlPlane, shared_dir: Path) -> None:
    crd = shared_dir / "openshift" / "securitycontextconstraints.crd.yaml"
    control_plane.kubectl("apply", "-f", str(crd))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/{SCC_CRD}", "--timeout=60s")


def apply_and_fetch(control_plane: ControlPlane, manifest: str) -> list[dict[str, Any]]:
    """``... | kubectl apply -f -`` then ``kubectl get -f -``: the objects as the server has them."""
    applied = control_plane.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert applied.returncode == 0, f"kubectl apply failed:\n{applied.stderr}\n{applied.stdout}"
    fetched = control_plane.kubectl("get", "-f", "-", "-o", "json", input=manifest, check=False)
    assert fetched.returncode == 0, fetched.stderr
    listed = json.loads(fetched.stdout)
    return list(listed["items"]) if listed.get("kind") == "List" else [listed]


@pytest.fixture(scope="module")
def applied(control_plane: ControlPlane, shared_dir: Path) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """The announcement's command for Kubernetes, then for OpenShift, applied to the API server:
    the rendered objects and the server's copies, by distribution. The webhook configuration is
    removed again at once (nothing serves it here, and it would reject other tests' pods), and so
    is the mark policy (it would refuse other tests' agents, which run under other ServiceAccounts)."""
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for distribution in ("Kubernetes", "OpenShift"):
            if distribution == "OpenShift":
                register_scc_crd(control_plane, shared_dir)
            manifest = render_announcement(distribution)
            out[distribution] = chart.parse(manifest)
            out[f"{distribution}/server"] = apply_and_fetch(control_plane, manifest)
            # Applying the same command again (the way an upgrade is done) is accepted too.
            again = control_plane.kubectl("apply", "-f", "-", input=render_announcement(distribution))
            assert "error" not in again.stderr.lower(), again.stderr
    finally:
        control_plane.kubectl("delete", "mutatingwebhookconfiguration", MWC_NAME, "--ignore-not-found")
        chart.remove_mark_policy(control_plane, MARK_POLICY)
    yield out


@pytest.mark.parametrize("distribution", ["Kubernetes", "OpenShift"])
def test_announcement_command_every_object_accepted(
    applied: dict[str, list[dict[str, Any]]], distribution: str
) -> None:
    rendered = applied[distribution]
    server = applied[f"{distribution}/server"]
    assert sorted(identity(o) for o in server) == sorted(identity(o) for o in rendered)
    for obj in server:
        assert obj["metadata"].get("uid"), identity(obj)
    kinds = {o["kind"] for o in rendered}
    expected = {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Secret",
        "Service",
        "PodDisruptionBudget",
        "DaemonSet",
        "Deployment",
        "MutatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    if distribution == "OpenShift":
        expected |= {"SecurityContextConstraints", "RoleBinding"}
    assert kinds == expected
    namespace = one(server, "Namespace")
    assert namespace["metadata"]["name"] == RELEASE_NS
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_openshift_scc_is_for_the_agent_alone(applied: dict[str, list[dict[str, Any]]]) -> None:
    scc = one(applied["OpenShift/server"], "SecurityContextConstraints", SCC_NAME)
    assert scc["allowPrivilegedContainer"] is True
    assert scc["allowHostPID"] is True
    assert scc["allowHostDirVolumePlugin"] is True
    for closed in ("allowHostNetwork", "allowHostPorts", "allowHostIPC"):
        assert scc[closed] is False, closed
    assert sorted(scc["volumes"]) == ["emptyDir", "hostPath", "projected"]
    # Granted through RBAC only: the SCC itself names nobody.
    assert not scc.get("users") and not scc.get("groups")
    binding = one(applied["OpenShift/server"], "RoleBinding")
    assert binding["metadata"]["namespace"] == RELEASE_NS
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": RELEASE_NS}]
    # Nothing in the Kubernetes rendering mentions OpenShift.
    assert "security.openshift.io" not in yaml.safe_dump_all(applied["Kubernetes"])


def test_applied_agent_daemonset(applied: dict[str, list[dict[str, Any]]]) -> None:
    for distribution in ("Kubernetes", "OpenShift"):
        ds = one(applied[f"{distribution}/server"], "DaemonSet")
        pod = ds["spec"]["template"]["spec"]
        assert pod["hostPID"] is True
        assert not pod.get("hostNetwork")
        assert pod["serviceAccountName"] == AGENT_SA
        assert pod["priorityClassName"] == "system-node-critical"
        assert {"operator": "Exists"} in pod["tolerations"]
        assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
        (container,) = pod["containers"]
        assert container["securityContext"]["privileged"] is True
        assert container["securityContext"]["runAsUser"] == 0
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["host-proc"] == {"name": "host-proc", "mountPath": "/host/proc", "readOnly": True}
        assert mounts["host-cgroup"] == {
            "name": "host-cgroup", "mountPath": "/host/sys/fs/cgroup", "readOnly": True
        }
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["host-proc"]["hostPath"] == {"path": "/proc", "type": "Directory"}
        assert volumes["host-cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
        env = {e["name"]: e for e in container["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        # The agent's command line (commands/run.py).
        assert container["command"] == ["istio-pod-network-controller"]
        assert container["args"] == [
            "run",
            "--proc-root=/host/proc",
            "--iptables-backend=auto",
            "--workers=4",
            f"--excluded-namespaces=kube-system,{RELEASE_NS}",
            "--listen-address=[::]:15300",
            "--log-level=info",
        ]
        (port,) = container["ports"]
        assert (port["name"], port["containerPort"]) == ("metrics", 15300)
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_applied_webhook_deployment_is_restricted(applied: dict[str, list[dict[str, Any]]]) -> None:
    for distribution in ("Kubernetes", "OpenShift"):
        objects = applied[f"{distribution}/server"]
        deployment = one(objects, "Deployment")
        assert deployment["spec"]["replicas"] == 2
        pod = deployment["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == WEBHOOK_SA
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # No fixed UID: OpenShift's restricted-v2 assigns one from the namespace's range.
        assert "runAsUser" not in pod["securityContext"]
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in sc and not sc.get("privileged")
        # The webhook's command line (commands/webhook.py). On OpenShift the waiter gets no fixed
        # UID: the webhook picks one of the namespace's range.
        openshift_only = ["--waiter-run-as-user=none"] if distribution == "OpenShift" else []
        assert container["args"] == [
            "webhook",
            "--port=9443",
            "--tls-cert-file=/etc/istio-pod-network-controller/tls/tls.crt",
            "--tls-private-key-file=/etc/istio-pod-network-controller/tls/tls.key",
            "--waiter-image=quay.io/istio-pod-network-controller/istio-pod-network-controller:0.1.0",
            *openshift_only,
            "--waiter-timeout=300",
            "--waiter-verify",
            f"--excluded-namespaces=kube-system,{RELEASE_NS}",
            "--log-level=info",
            "--request-timeout=8",  # below the webhook configuration's 10 s: failurePolicy decides
        ]
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        service = one(objects, "Service")
        assert service["spec"]["ports"][0]["port"] == 443
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        pdb = one(objects, "PodDisruptionBudget")
        assert pdb["spec"]["minAvailable"] == 1
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def _pem(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_applied_webhook_configuration_and_certificate(applied: dict[str, list[dict[str, Any]]]) -> None:
    objects = applied["Kubernetes/server"]
    mwc = one(objects, "MutatingWebhookConfiguration", MWC_NAME)
    secret = one(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    webhooks = {w["name"]: w for w in mwc["webhooks"]}
    assert set(webhooks) == {
        "namespaces.istio-pod-network-controller.io",
        "pods.istio-pod-network-controller.io",
    }
    for hook in webhooks.values():
        assert hook["reinvocationPolicy"] == "IfNeeded"
        assert hook["sideEffects"] == "None"
        assert hook["failurePolicy"] == "Fail"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ]
        assert hook["clientConfig"]["service"] == {
            "name": WEBHOOK_SA,
            "namespace": RELEASE_NS,
            "path": "/mutate",
            "port": 443,
        }
        assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
        excluded = hook["namespaceSelector"]["matchExpressions"][0]
        assert excluded == {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", RELEASE_NS],
        }

    ca = x509.load_pem_x509_certificate(_pem(secret["data"]["ca.crt"]))
    cert = x509.load_pem_x509_certificate(_pem(secret["data"]["tls.crt"]))
    key = serialization.load_pem_private_key(_pem(secret["data"]["tls.key"]), password=None)
    cert.verify_directly_issued_by(ca)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{WEBHOOK_SA}.{RELEASE_NS}.svc" in sans.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    # The Deployment restarts when the certificate changes.
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]


# --------------------------------------------------------------------------------------------
# 2. RBAC, as the API server's authorizer sees it

ALL_NAMESPACES = None
SOME_NS = "some-app"

# (verb, resource, api group, namespace or None for all, subresource or None)
Case = tuple[str, str, str, str | None, str | None]

AGENT_MAY: list[Case] = [
    ("get", "pods", "", SOME_NS, None),
    ("list", "pods", "", ALL_NAMESPACES, None),
    ("watch", "pods", "", ALL_NAMESPACES, None),
    ("patch", "pods", "", SOME_NS, None),
    ("get", "namespaces", "", ALL_NAMESPACES, None),
    ("list", "namespaces", "", ALL_NAMESPACES, None),
    ("watch", "namespaces", "", ALL_NAMESPACES, None),
    ("create", "events", "", SOME_NS, None),
    ("patch", "events", "", SOME_NS, None),
    ("create", "events", "events.k8s.io", SOME_NS, None),
    ("patch", "events", "events.k8s.io", SOME_NS, None),
]
AGENT_MAY_NOT: list[Case] = [
    ("delete", "pods", "", SOME_NS, None),
    ("create", "pods", "", SOME_NS, None),
    ("update", "pods", "", SOME_NS, None),
    ("deletecollection", "pods", "", SOME_NS, None),
    ("patch", "pods", "", SOME_NS, "status"),
    ("create", "pods", "", SOME_NS, "exec"),
    ("create", "pods", "", SOME_NS, "eviction"),
    ("get", "pods", "", SOME_NS, "log"),
    ("get", "secrets", "", SOME_NS, None),
    ("list", "secrets", "", ALL_NAMESPACES, None),
    ("get", "secrets", "", RELEASE_NS, None),
    ("get", "configmaps", "", SOME_NS, None),
    ("get", "nodes", "", ALL_NAMESPACES, None),
    ("patch", "nodes", "", ALL_NAMESPACES, None),
    ("update", "nodes", "", ALL_NAMESPACES, "status"),
    ("patch", "namespaces", "", ALL_NAMESPACES, None),
    ("delete", "namespaces", "", ALL_NAMESPACES, None),
    ("get", "events", "", SOME_NS, None),
    ("list", "events", "", SOME_NS, None),
    ("delete", "events", "", SOME_NS, None),
    ("create", "serviceaccounts", "", RELEASE_NS, "token"),
    ("patch", "daemonsets", "apps", RELEASE_NS, None),
    ("create", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", ALL_NAMESPACES, None),
    ("bind", "clusterroles", "rbac.authorization.k8s.io", ALL_NAMESPACES, None),
    ("escalate", "clusterroles", "rbac.authorization.k8s.io", ALL_NAMESPACES, None),
    ("impersonate", "users", "", ALL_NAMESPACES, None),
]
WEBHOOK_MAY: list[Case] = [
    ("get", "namespaces", "", ALL_NAMESPACES, None),
]
WEBHOOK_MAY_NOT: list[Case] = [
    ("list", "namespaces", "", ALL_NAMESPACES, None),
    ("watch", "namespaces", "", ALL_NAMESPACES, None),
    ("get", "pods", "", SOME_NS, None),
    ("list", "pods", "", ALL_NAMESPACES, None),
    ("patch", "pods", "", SOME_NS, None),
    ("create", "pods", "", SOME_NS, None),
    ("delete", "pods", "", SOME_NS, None),
    ("get", "secrets", "", RELEASE_NS, None),
    ("list", "secrets", "", ALL_NAMESPACES, None),
    ("patch", "namespaces", "", ALL_NAMESPACES, None),
    ("create", "events", "", SOME_NS, None),
    ("patch", "nodes", "", ALL_NAMESPACES, None),
    ("patch", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", ALL_NAMESPACES, None),
    ("create", "serviceaccounts", "", RELEASE_NS, "token"),
]


def _rbac_id(case: Case) -> str:
    verb, resource, group, namespace, sub = case
    res = f"{resource}/{sub}" if sub else resource
    return f"{verb} {group + '/' if group else ''}{res} in {namespace or 'all'}"


def _matrix(sa: str, cases: list[Case], allowed: bool) -> list[Any]:
    return [
        pytest.param(
            sa, c, allowed, id=f"{sa.rsplit('-', 1)[1]} may{'' if allowed else ' not'}: {_rbac_id(c)}"
        )
        for c in cases
    ]


@pytest.mark.parametrize(
    ("service_account", "case", "allowed"),
    _matrix(AGENT_SA, AGENT_MAY, True)
    + _matrix(AGENT_SA, AGENT_MAY_NOT, False)
    + _matrix(WEBHOOK_SA, WEBHOOK_MAY, True)
    + _matrix(WEBHOOK_SA, WEBHOOK_MAY_NOT, False),
)
def test_rbac_matrix(
    applied: dict[str, list[dict[str, Any]]],
    kube: Client,
    service_account: str,
    case: Case,
    allowed: bool,
) -> None:
    verb, resource, group, namespace, sub = case
    answer = chart.can(
        kube,
        RELEASE_NS,
        service_account,
        verb,
        resource,
        group=group,
        in_namespace=namespace,
        subresource=sub,
    )
    assert answer is allowed


@pytest.mark.parametrize(
    ("service_account", "scc", "namespace", "allowed"),
    [
        (AGENT_SA, SCC_NAME, RELEASE_NS, True),
        (AGENT_SA, SCC_NAME, SOME_NS, False),  # only for pods of its own namespace
        (AGENT_SA, "privileged", RELEASE_NS, False),
        (AGENT_SA, "anyuid", RELEASE_NS, False),
        (WEBHOOK_SA, SCC_NAME, RELEASE_NS, False),
        (WEBHOOK_SA, "privileged", RELEASE_NS, False),
    ],
)
def test_openshift_scc_use(
    applied: dict[str, list[dict[str, Any]]],
    kube: Client,
    service_account: str,
    scc: str,
    namespace: str,
    allowed: bool,
) -> None:
    answer = chart.can(
        kube,
        RELEASE_NS,
        service_account,
        "use",
        "securitycontextconstraints",
        group="security.openshift.io",
        in_namespace=namespace,
        name=scc,
    )
    assert answer is allowed


def _pod(name: str, namespace: str, *, node: str = "node-1", labels: dict[str, str] | None = None) -> Pod:
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace, labels=labels),
        spec=PodSpec(nodeName=node, containers=[Container(name="app", image="example.invalid/app:1")]),
    )


def test_agent_token_from_helper_works_under_chart_rbac(
    control_plane: ControlPlane, kube: Client, namespace: str, tmp_path: Path
) -> None:
    """The helper the agent tests use: a real token of the chart's agent ServiceAccount can do the
    agent's job (list+watch its node's pods, read namespaces, patch status, write Events) and is
    refused the rest."""
    agent_ns = f"{namespace}-ipnc"
    kubeconfig = chart.agent_kubeconfig(control_plane, agent_ns, tmp_path / "agent.kubeconfig")
    try:
        kube.create(_pod("mine", namespace))
        kube.create(_pod("other-node", namespace, node="node-2"))
        with control_plane.client(KubeConfig.from_file(kubeconfig)) as agent:
            listed = agent.list(Pod, namespace="*", fields={"spec.nodeName": "node-1"})
            assert "mine" in [p.metadata.name for p in listed if p.metadata]
            assert namespace in [n.metadata.name for n in agent.list(Namespace) if n.metadata]
            patch = {"metadata": {"annotations": {names.STATUS: names.STATUS_INITIALIZED}}}
            agent.patch(Pod, "mine", patch, namespace=namespace, patch_type=PatchType.MERGE)
            pod = kube.get(Pod, "mine", namespace=namespace)
            assert pod.metadata is not None and pod.metadata.annotations == {names.STATUS: "initialized"}
            agent.create(
                Event(
                    metadata=ObjectMeta(generateName="mine.", namespace=namespace),
                    involvedObject=ObjectReference(
                        kind="Pod", namespace=namespace, name="mine", apiVersion="v1"
                    ),
                    reason="Initialized",
                    message="redirect rules in place",
                    type="Normal",
                )
            )
            for forbidden in (
                lambda: agent.delete(Pod, "mine", namespace=namespace),
                lambda: agent.create(_pod("new", namespace)),
                lambda: list(agent.list(Secret, namespace=agent_ns)),
                lambda: list(agent.list(Event, namespace=namespace)),
            ):
                with pytest.raises(ApiError) as denied:
                    forbidden()
                assert denied.value.status.code == 403
                assert f"system:serviceaccount:{agent_ns}:" in (denied.value.status.message or "")
    finally:
        kube.delete(Namespace, agent_ns)


# --------------------------------------------------------------------------------------------
# 3. the webhook's scope, as the API server applies it


def test_webhook_scope_on_the_api_server(control_plane: ControlPlane, kube: Client, namespace: str) -> None:
    """With the chart's MutatingWebhookConfiguration and no webhook serving it, a pod the API
    server sends to the webhook is refused (failurePolicy Fail) and names the webhook entry; a pod
    out of scope is created as is."""
    release_ns = f"{namespace}-rel"
    fullname = chart.fullname_for(namespace)
    objects = chart.parse(
        chart.template(release_ns, {"fullnameOverride": fullname, "webhook.timeoutSeconds": 1})
    )
    mwc = one(objects, "MutatingWebhookConfiguration")
    meshed_ns, plain_ns = f"{namespace}-meshed", f"{namespace}-plain"
    opt_in = {names.OPT_IN: names.OPT_IN_VALUE}
    for ns, labels in ((release_ns, None), (meshed_ns, opt_in), (plain_ns, None)):
        kube.create(Namespace(metadata=ObjectMeta(name=ns, labels=labels)))
    created: list[tuple[str, str]] = []
    try:
        chart.apply(control_plane, [mwc])

        def outcome(name: str, ns: str, labels: dict[str, str] | None = None) -> str:
            try:
                kube.create(_pod(name, ns, labels=labels))
            except ApiError as e:
                return e.status.message or ""
            created.append((ns, name))
            return "created"

        # Pods of an opted-in namespace: the "namespaces" entry.
        refused = outcome("a", meshed_ns)
        assert 'failed calling webhook "namespaces.istio-pod-network-controller.io"' in refused
        # Labelled pods elsewhere: the "pods" entry.
        refused = outcome("b", plain_ns, opt_in)
        assert 'failed calling webhook "pods.istio-pod-network-controller.io"' in refused
        # Out of scope: not opted in; the release's own namespace; kube-system.
        assert outcome("c", plain_ns) == "created"
        assert outcome("d", plain_ns, {names.OPT_IN: "false"}) == "created"
        assert outcome("e", release_ns, opt_in) == "created"
        assert outcome(f"ipnc-{namespace}", "kube-system", opt_in) == "created"
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", mwc["metadata"]["name"], "--ignore-not-found"
        )
        for ns, name in created:
            if ns == "kube-system":
                kube.delete(Pod, name, namespace=ns, grace_period=0)
        for ns in (release_ns, meshed_ns, plain_ns):
            kube.delete(Namespace, ns)


def test_failure_policy_ignore_admits_when_webhook_is_down(
    control_plane: ControlPlane, kube: Client, namespace: str
) -> None:
    release_ns = f"{namespace}-rel"
    objects = chart.parse(
        chart.template(
            release_ns,
            {
                "fullnameOverride": chart.fullname_for(namespace),
                "webhook.timeoutSeconds": 1,
                "webhook.failurePolicy": "Ignore",
            },
        )
    )
    mwc = one(objects, "MutatingWebhookConfiguration")
    assert {w["failurePolicy"] for w in mwc["webhooks"]} == {"Ignore"}
    kube.patch(
        Namespace,
        namespace,
        {"metadata": {"labels": {names.OPT_IN: names.OPT_IN_VALUE}}},
        patch_type=PatchType.MERGE,
    )
    try:
        chart.apply(control_plane, [mwc])
        created = kube.create(_pod("p", namespace))
        assert created.metadata is not None and created.metadata.name == "p"
    finally:
        control_plane.kubectl(
            "delete", "mutatingwebhookconfiguration", mwc["metadata"]["name"], "--ignore-not-found"
        )


# --------------------------------------------------------------------------------------------
# helm install / upgrade / uninstall against the API server


def test_helm_install_upgrade_keeps_certificate_and_uninstall(
    control_plane: ControlPlane, kube: Client, namespace: str
) -> None:
    fullname = chart.fullname_for(namespace)
    common = ["-n", namespace, "--set", f"fullnameOverride={fullname}", str(chart.chart_dir())]
    kubeconfig = control_plane.kubeconfig_path
    try:
        installed = chart.helm("install", "ipnc", *common, kubeconfig=kubeconfig)
        assert "STATUS: deployed" in installed.stdout
        assert f"kubectl -n {namespace} rollout status daemonset/{fullname}-agent" in installed.stdout
        manifest = chart.parse(
            chart.helm("get", "manifest", "ipnc", "-n", namespace, kubeconfig=kubeconfig).stdout
        )
        # The namespace existed: helm's lookup saw it, so the chart did not render it.
        assert not by_kind(manifest, "Namespace")

        def ca() -> str:
            secret = kube.get(Secret, f"{fullname}-webhook-tls", namespace=namespace)
            assert secret.data is not None
            return str(secret.data["ca.crt"])

        def ca_bundles() -> set[str]:
            mwc = f"zz-{fullname}"
            out = control_plane.kubectl("get", "mutatingwebhookconfiguration", mwc, "-o", "json").stdout
            return {w["clientConfig"]["caBundle"] for w in json.loads(out)["webhooks"]}

        before = ca()
        assert ca_bundles() == {before}
        chart.helm("upgrade", "ipnc", *common, "--set", "logLevel=debug", kubeconfig=kubeconfig)
        assert ca() == before
        assert ca_bundles() == {before}
    finally:
        chart.helm("uninstall", "ipnc", "-n", namespace, kubeconfig=kubeconfig, check=False)
        chart.remove_mark_policy(control_plane, chart.mark_policy_name(fullname))
    gone = control_plane.kubectl("get", "mutatingwebhookconfiguration", f"zz-{fullname}", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


# --------------------------------------------------------------------------------------------
# 4. lint, schema, rendering variants (helm only)


@pytest.mark.parametrize(
    "settings",
    [
        ["kubernetesDistribution=Kubernetes"],
        ["kubernetesDistribution=OpenShift"],
        ["webhook.certManager.enabled=true"],
        ["webhook.enabled=false"],
        ["metrics.serviceMonitor.enabled=true", "webhook.failurePolicy=Ignore"],
        ["markProtection.enabled=false"],
        ["kubernetesDistribution=OpenShift", "markProtection.enabled=false"],
    ],
    ids=lambda settings: ",".join(settings),
)
def test_helm_lint_is_clean(settings: list[str]) -> None:
    sets = [arg for setting in settings for arg in ("--set", setting)]
    result = chart.helm("lint", "--strict", *sets, str(chart.chart_dir()), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    for level in ("[INFO]", "[WARNING]", "[ERROR]"):
        assert level not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "kubernetesDistribution=Foo",
            "at '/kubernetesDistribution': 'Foo' does not match pattern '^(Kubernetes|OpenShift)$'",
        ),
        ("kubernetesDistribution=openshift", "at '/kubernetesDistribution': 'openshift' does not match"),
        (
            "webhook.failurePolicy=Never",
            "at '/webhook/failurePolicy': 'Never' does not match pattern '^(Fail|Ignore)$'",
        ),
        ("agent.iptablesBackend=iptables", "at '/agent/iptablesBackend': 'iptables' does not match"),
        ("logLevel=verbose", "at '/logLevel': 'verbose' does not match"),
        ("agent.workers=0", "at '/agent/workers': minimum: got 0, want 1"),
        ("agent.port=80", "at '/agent/port': minimum: got 80"),
        ("webhook.timeoutSeconds=60", "at '/webhook/timeoutSeconds': maximum: got 60, want 30"),
        ("waiter.timeoutSeconds=0", "at '/waiter/timeoutSeconds': minimum: got 0, want 1"),
        ("waiter.verify=maybe", "at '/waiter/verify': got string, want boolean"),
        ("waiter.runAsUser=0", "at '/waiter/runAsUser': minimum: got 0, want 1"),
        ("waiter.runAsUser=root", "at '/waiter/runAsUser': 'root' does not match"),
        (
            "excludedNamespaces[0]=Not_A_Namespace",
            "at '/excludedNamespaces/0': 'Not_A_Namespace' does not match",
        ),
        ("image.digest=md5:abc", "at '/image/digest': 'md5:abc' does not match"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': 'Sometimes' does not match"),
        ("agent.hostProcPath=proc", "at '/agent/hostProcPath': 'proc' does not match"),
        ("agent.hostCgroupPath=sys", "at '/agent/hostCgroupPath': 'sys' does not match"),
        ("webhook.certManager.duration=1year", "at '/webhook/certManager/duration': '1year' does not match"),
        ("agent.worker=4", "at '/agent': additional properties 'worker' not allowed"),
        ("kubernetesDistrib=OpenShift", "additional properties 'kubernetesDistrib' not allowed"),
        ("markProtection.enabled=maybe", "at '/markProtection/enabled': got string, want boolean"),
        ("markProtection.enable=false", "at '/markProtection': additional properties 'enable' not allowed"),
        ("nativeNftables=maybe", "at '/nativeNftables': got string, want boolean"),
    ],
)
def test_schema_rejects_bad_values_naming_them(setting: str, expected: str) -> None:
    result = chart.helm("template", "-n", RELEASE_NS, "--set", setting, str(chart.chart_dir()), check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "values",
    [
        {"webhook.enabled": False},
        {"webhook.failurePolicy": "Ignore", "webhook.scope.namespaceLabel": False},
        {
            "webhook.scope.podLabel": False,
            "webhook.namespaceSelectorExpressions[0].key": "team",
            "webhook.namespaceSelectorExpressions[0].operator": "In",
            "webhook.namespaceSelectorExpressions[0].values[0]": "payments",
        },
        {
            "webhook.objectSelectorExpressions[0].key": "app",
            "webhook.objectSelectorExpressions[0].operator": "Exists",
        },
        {
            "agent.updateStrategy.rollingUpdate.maxUnavailable": "10%",
            "agent.priorityClassName": "",
            "webhook.podDisruptionBudget.minAvailable": "50%",
            "webhook.priorityClassName": "system-cluster-critical",
            "imagePullSecrets[0].name": "pull",
            "waiter.runAsUser": 1000,
        },
    ],
    ids=["webhook-off", "ignore-pods-only", "namespaces-only", "object-expression", "tuned"],
)
def test_variants_are_accepted_by_the_api_server(
    control_plane: ControlPlane, shared_dir: Path, namespace: str, values: dict[str, str | int | bool]
) -> None:
    register_scc_crd(control_plane, shared_dir)
    for distribution in ("Kubernetes", "OpenShift"):
        manifest = chart.template(namespace, values, distribution=distribution)
        result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
        assert result.returncode == 0, result.stderr


def test_scope_needs_one_entry() -> None:
    result = chart.helm(
        "template",
        "--set",
        "webhook.scope.namespaceLabel=false",
        "--set",
        "webhook.scope.podLabel=false",
        str(chart.chart_dir()),
        check=False,
    )
    assert result.returncode != 0
    assert "webhook.scope: at least one of namespaceLabel and podLabel must be true" in result.stderr


def test_namespace_rendered_only_where_it_may_be() -> None:
    # Without -n, helm renders for "default": the chart must not relabel it privileged.
    assert not by_kind(chart.parse(chart.helm("template", str(chart.chart_dir())).stdout), "Namespace")
    assert not by_kind(chart.parse(chart.template("kube-system")), "Namespace")
    assert not by_kind(chart.parse(chart.template("x", {"namespace.create": False})), "Namespace")
    ns = one(chart.parse(chart.template("x", distribution="OpenShift")), "Namespace")
    assert ns["metadata"]["labels"]["security.openshift.io/scc.podSecurityLabelSync"] == "false"


def test_every_template_names_the_release_namespace() -> None:
    objects = chart.parse(chart.template("elsewhere", distribution="OpenShift"))
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "SecurityContextConstraints",
    }
    for obj in objects:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], identity(obj)
        else:
            assert obj["metadata"]["namespace"] == "elsewhere", identity(obj)


def test_cert_manager_mode() -> None:
    objects = chart.parse(chart.template(RELEASE_NS, {"webhook.certManager.enabled": True}))
    assert not by_kind(objects, "Secret")
    certs = {o["metadata"]["name"]: o for o in by_kind(objects, "Certificate")}
    serving = certs[WEBHOOK_SA]
    assert serving["spec"]["secretName"] == f"{WEBHOOK_SA}-tls"
    assert f"{WEBHOOK_SA}.{RELEASE_NS}.svc" in serving["spec"]["dnsNames"]
    assert serving["spec"]["issuerRef"]["name"] == "istio-pod-network-controller-ca"
    assert len(by_kind(objects, "Issuer")) == 2
    mwc = one(objects, "MutatingWebhookConfiguration")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{RELEASE_NS}/{WEBHOOK_SA}"
    assert all("caBundle" not in w["clientConfig"] for w in mwc["webhooks"])
    # An existing issuer: the chart makes no CA of its own.
    objects = chart.parse(
        chart.template(
            RELEASE_NS,
            {
                "webhook.certManager.enabled": True,
                "webhook.certManager.issuerRef.name": "corp-ca",
                "webhook.certManager.issuerRef.kind": "ClusterIssuer",
            },
        )
    )
    assert not by_kind(objects, "Issuer")
    (serving,) = by_kind(objects, "Certificate")
    assert serving["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


@pytest.mark.parametrize(
    ("distribution", "run_as_user", "expected"),
    [
        ("Kubernetes", None, []),
        ("OpenShift", None, ["--waiter-run-as-user=none"]),
        ("Kubernetes", "none", ["--waiter-run-as-user=none"]),
        ("Kubernetes", 1000, ["--waiter-run-as-user=1000"]),
        ("OpenShift", 1000, ["--waiter-run-as-user=1000"]),
    ],
)
def test_waiter_run_as_user(distribution: str, run_as_user: str | int | None, expected: list[str]) -> None:
    values = {} if run_as_user is None else {"waiter.runAsUser": run_as_user}
    objects = chart.parse(chart.template(RELEASE_NS, values, distribution=distribution))
    args = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--waiter-run-as-user")] == expected


@pytest.mark.parametrize("distribution", ["Kubernetes", "OpenShift"])
def test_rendered_command_lines_parse_with_the_real_parsers(distribution: str) -> None:
    """The flags the chart passes are the ones ``run`` and ``webhook`` define (values included)."""
    objects = chart.parse(chart.template(RELEASE_NS, distribution=distribution))
    containers = {
        "run": one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0],
        "webhook": one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0],
    }
    for subcommand, container in containers.items():
        assert container["args"][0] == subcommand
        try:
            module = importlib.import_module(f"istio_pod_network_controller.commands.{subcommand}")
        except ModuleNotFoundError:
            pytest.skip(f"commands/{subcommand}.py has not landed yet")
        parsed = module.build_parser().parse_args(container["args"][1:])
        if subcommand == "run":
            assert parsed.proc_root == "/host/proc"
            assert parsed.listen_address == ("::", 15300)
            assert parsed.excluded_namespaces == f"kube-system,{RELEASE_NS}"
        else:
            assert parsed.port == 9443
            assert parsed.waiter_verify is True
            assert parsed.waiter_timeout == 300
            assert parsed.waiter_run_as_user == (None if distribution == "OpenShift" else 65532)


def test_webhook_disabled_renders_agent_only() -> None:
    objects = chart.parse(chart.template(RELEASE_NS, {"webhook.enabled": False}))
    # The mark policy stays: it protects the agent's mark whoever injects the waiter.
    assert {o["kind"] for o in objects} == {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    assert [o["metadata"]["name"] for o in by_kind(objects, "ServiceAccount")] == [AGENT_SA]


def test_tuned_values_reach_the_pods() -> None:
    objects = chart.parse(
        chart.template(
            RELEASE_NS,
            {
                "image.repository": "registry.example/ipnc",
                "image.tag": "1.2.3",
                "waiter.image.repository": "registry.example/ipnc-waiter",
                "waiter.image.digest": "sha256:" + "a" * 64,
                "waiter.timeoutSeconds": 60,
                "waiter.verify": False,
                "waiter.image.pullPolicy": "Always",
                "agent.iptablesBackend": "legacy",
                "agent.workers": 8,
                "agent.port": 19090,
                "logLevel": "debug",
                "excludedNamespaces[0]": "kube-system",
                "excludedNamespaces[1]": "batch",
                "webhook.replicas": 3,
                "webhook.scope.podLabel": False,
                "webhook.namespaceSelectorExpressions[0].key": "team",
                "webhook.namespaceSelectorExpressions[0].operator": "Exists",
            },
        )
    )
    agent = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "registry.example/ipnc:1.2.3"
    assert "--iptables-backend=legacy" in agent["args"]
    assert "--workers=8" in agent["args"]
    assert "--listen-address=[::]:19090" in agent["args"]
    assert "--log-level=debug" in agent["args"]
    assert f"--excluded-namespaces=kube-system,batch,{RELEASE_NS}" in agent["args"]
    webhook = one(objects, "Deployment")
    assert webhook["spec"]["replicas"] == 3
    args = webhook["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--waiter-image=registry.example/ipnc-waiter@sha256:" + "a" * 64 in args
    assert "--waiter-timeout=60" in args
    assert "--waiter-image-pull-policy=Always" in args
    assert "--waiter-verify" not in args
    assert not [a for a in args if a.startswith("--waiter-run-as-user")]
    (hook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["name"] == "namespaces.istio-pod-network-controller.io"
    assert {"key": "team", "operator": "Exists"} in hook["namespaceSelector"]["matchExpressions"]


@pytest.mark.parametrize("distribution", ["Kubernetes", "OpenShift"])
def test_mark_policy_rendering(distribution: str) -> None:
    """Both distributions render the policy and its binding: only the release's agent may write the
    mark, in every namespace but the excluded ones; failurePolicy Fail."""
    values = {"excludedNamespaces[0]": "kube-system", "excludedNamespaces[1]": "batch"}
    objects = chart.parse(chart.template("elsewhere", values, distribution=distribution))
    policy = one(objects, "ValidatingAdmissionPolicy", MARK_POLICY)
    binding = one(objects, "ValidatingAdmissionPolicyBinding", MARK_POLICY)
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    matched = {
        (operation, resource)
        for rule in spec["matchConstraints"]["resourceRules"]
        for operation in rule["operations"]
        for resource in rule["resources"]
    }
    # Every way into a pod's annotations: the pod, its status, a Binding.
    assert {("UPDATE", "pods"), ("UPDATE", "pods/status"), ("CREATE", "pods")} <= matched
    assert {("CREATE", "pods/binding"), ("CREATE", "bindings")} <= matched
    agent = f"system:serviceaccount:elsewhere:{AGENT_SA}"
    assert [v for v in spec["validations"] if agent in v["expression"]]
    # A pod-bound agent token marks only pods of its own node.
    assert [v for v in spec["validations"] if "variables.podNode in variables.tokenNodes" in v["expression"]]
    for validation in spec["validations"]:
        assert validation["reason"] == "Forbidden"
        message = validation.get("messageExpression", "") + validation["message"]
        assert "pod-network-controller.istio.io/" in message
    assert binding["spec"]["policyName"] == MARK_POLICY
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", "batch", "elsewhere"],
        }
    ]


def test_mark_protection_off_renders_no_policy_and_old_clusters_need_it_off() -> None:
    off = chart.parse(chart.template(RELEASE_NS, {"markProtection.enabled": False}))
    assert not [o for o in off if o["kind"] in chart.MARK_POLICY_KINDS]
    assert by_kind(off, "DaemonSet")
    # A cluster without admissionregistration.k8s.io/v1 policies: a message saying what to do.
    old = chart.helm("template", "--kube-version", "1.29.4", str(chart.chart_dir()), check=False)
    assert old.returncode != 0
    assert "needs Kubernetes 1.30 or later" in old.stderr
    assert "set markProtection.enabled=false" in old.stderr
    args = ["template", "--kube-version", "1.29.4", "--set", "markProtection.enabled=false"]
    assert chart.helm(*args, str(chart.chart_dir())).returncode == 0


@pytest.mark.parametrize(
    ("values", "native"),
    [
        ({}, False),
        ({"nativeNftables": True}, True),
        ({"global.nativeNftables": True}, True),
        ({"nativeNftables": False, "global.nativeNftables": False}, False),
    ],
    ids=["default", "nativeNftables", "global.nativeNftables", "both-false"],
)
def test_native_nftables_reaches_the_agent(values: dict[str, bool], native: bool) -> None:
    from istio_pod_network_controller.commands import run

    objects = chart.parse(chart.template(RELEASE_NS, values))
    args = one(objects, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ("--native-nftables" in args) is native
    assert run.build_parser().parse_args(args[1:]).native_nftables is native
    assert "--iptables-backend=auto" in args  # still the iptables variant, unused in nftables mode


def test_host_cgroup_tree_is_optional() -> None:
    objects = chart.parse(chart.template(RELEASE_NS, {"agent.hostCgroupPath": ""}))
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert "host-cgroup" not in {v["name"] for v in pod["volumes"]}
    assert "host-cgroup" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}
