"""Only the agent can mark a pod, and the API server enforces it: the chart's ValidatingAdmissionPolicy
against the real kube-apiserver.

A tenant holds a token of a ServiceAccount bound to the built-in ``edit`` ClusterRole in its own
namespace (what a team is usually given: it may create, patch and delete its pods). With the chart's
policy in force, step by step:

1. it cannot create a pod that carries the agent's status or detail annotation;
2. it can create its pod, and patch that pod's other annotations and labels;
3. it cannot merge-patch ``status: initialized`` and a forged detail onto its pod;
4. the agent's ServiceAccount (a real token, under the chart's RBAC) marks the pod; with a token
   bound to an agent pod (as the DaemonSet's are), only pods of that pod's node;
5. the tenant cannot remove or change that mark, and still patches everything else;
6. nobody changes ``iptables-args`` after creation, the agent included;
7. the other ways into a pod's annotations (pods/status, Bindings) are closed too, even to a
   cluster admin, and the excluded namespaces are left alone;
8. with ``markProtection.enabled=false`` (helm upgrade), the same forgery is admitted.

Every refusal is a 403 whose message names the policy and the annotation. The policy is applied
only for the tests that need it and removed afterwards (waiting until the API server has let go
of it): the control plane is shared with other tests, whose agents run under other
ServiceAccounts.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import Container, PodSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod
from lightkube.types import PatchType

from ipnc_dev import chart
from ipnc_dev.controlplane import ControlPlane
from istio_pod_network_controller import names

pytestmark = pytest.mark.cluster

FORGED_DETAIL = json.dumps({"netnsInode": 4026531840, "rulesetSha256": "0" * 64, "node": "node-1"})
AGENT_DETAIL = json.dumps({"netnsInode": 4026532001, "rulesetSha256": "a" * 64, "node": "node-1"})
ARGS = json.dumps(["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*"])


def _pod(name: str, namespace: str, annotations: dict[str, str] | None = None) -> Pod:
    return Pod(
        metadata=ObjectMeta(name=name, namespace=namespace, annotations=annotations),
        spec=PodSpec(nodeName="node-1", containers=[Container(name="app", image="example.invalid/app:1")]),
    )


def _annotations(client: Client, name: str, namespace: str) -> dict[str, str]:
    pod = client.get(Pod, name, namespace=namespace)
    assert pod.metadata is not None
    return dict(pod.metadata.annotations or {})


def _merge(client: Client, name: str, namespace: str, metadata: dict[str, Any]) -> None:
    client.patch(Pod, name, {"metadata": metadata}, namespace=namespace, patch_type=PatchType.MERGE)


def _merge_status(client: Client, name: str, namespace: str, metadata: dict[str, Any]) -> None:
    """The same merge patch of the pod's metadata, sent to its status subresource."""
    client.patch(Pod.Status, name, {"metadata": metadata}, namespace=namespace, patch_type=PatchType.MERGE)


def refusal(action: Callable[..., object], *args: Any) -> str:
    """The API server's message refusing ``action(*args)`` (which must be refused with 403)."""
    with pytest.raises(ApiError) as refused:
        action(*args)
    assert refused.value.status.code == 403, refused.value.status
    return refused.value.status.message or ""


@dataclass(frozen=True)
class Setup:
    release_ns: str
    tenant_ns: str
    policy: str
    agent_user: str
    agent: Client
    tenant: Client
    admin: Client

    def refused_by_policy(self, message: str, *annotations: str) -> None:
        """``message`` is this policy's refusal and names each of ``annotations``."""
        assert f"ValidatingAdmissionPolicy '{self.policy}'" in message, message
        for annotation in annotations:
            assert annotation in message, message


def _tenant_and_agent(
    control_plane: ControlPlane, release_ns: str, tenant_ns: str, folder: Path
) -> tuple[Client, Client]:
    agent_config = chart.agent_kubeconfig(control_plane, release_ns, folder / "agent.kubeconfig")
    tenant_config = chart.tenant_kubeconfig(control_plane, tenant_ns, path=folder / "tenant.kubeconfig")
    return (
        control_plane.client(KubeConfig.from_file(agent_config)),
        control_plane.client(KubeConfig.from_file(tenant_config)),
    )


# --------------------------------------------------------------------------------------------
# with the policy in force


@pytest.fixture(scope="class")
def setup(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A release namespace (the chart's RBAC and mark policy, for it) and a tenant's namespace, for
    the tests of one class; the policy is in force throughout."""
    suffix = uuid.uuid4().hex[:8]
    release_ns, tenant_ns = f"ipnc-{suffix}", f"tenant-{suffix}"
    folder = tmp_path_factory.mktemp("mark-policy")
    with control_plane.client() as admin:
        admin.create(Namespace(metadata=ObjectMeta(name=tenant_ns)))
        agent, tenant = _tenant_and_agent(control_plane, release_ns, tenant_ns, folder)
        accounts = chart.ChartAccounts(namespace=release_ns, fullname=chart.fullname_for(release_ns))
        try:
            with chart.mark_policy(control_plane, release_ns) as policy:
                yield Setup(
                    release_ns=release_ns,
                    tenant_ns=tenant_ns,
                    policy=policy,
                    agent_user=accounts.user(accounts.agent),
                    agent=agent,
                    tenant=tenant,
                    admin=admin,
                )
        finally:
            agent.close()
            tenant.close()
            for ns in (tenant_ns, release_ns):
                admin.delete(Namespace, ns)


class TestEnforced:
    """The policy in force: what the tenant, the agent and others may and may not do."""

    def test_tenant_cannot_create_a_pod_carrying_the_mark(self, setup: Setup) -> None:
        ns = setup.tenant_ns
        for name, marks in (
            ("with-status", {names.STATUS: names.STATUS_INITIALIZED}),
            ("with-detail", {names.DETAIL: FORGED_DETAIL}),
            ("with-both", {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: FORGED_DETAIL}),
            ("with-error", {names.STATUS: names.STATUS_ERROR}),
        ):
            message = refusal(setup.tenant.create, _pod(name, ns, marks))
            setup.refused_by_policy(message, *marks, setup.agent_user)
            assert f"not by system:serviceaccount:{ns}:tenant" in message
        with pytest.raises(ApiError) as gone:
            setup.admin.get(Pod, "with-status", namespace=ns)
        assert gone.value.status.code == 404

    def test_tenant_cannot_forge_the_mark_on_its_pod(self, setup: Setup) -> None:
        ns = setup.tenant_ns
        setup.tenant.create(_pod("forge", ns, {"team": "payments"}))
        forgery = {"annotations": {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: FORGED_DETAIL}}
        message = refusal(_merge, setup.tenant, "forge", ns, forgery)
        setup.refused_by_policy(message, names.STATUS, names.DETAIL)
        # Either half alone is refused as well.
        for half in (names.STATUS, names.DETAIL):
            one = {"annotations": {half: forgery["annotations"][half]}}
            setup.refused_by_policy(refusal(_merge, setup.tenant, "forge", ns, one), half)
        assert _annotations(setup.admin, "forge", ns) == {"team": "payments"}
        # What the tenant may do to its pod it still does.
        _merge(setup.tenant, "forge", ns, {"annotations": {"team": "billing"}, "labels": {"tier": "web"}})
        assert _annotations(setup.admin, "forge", ns) == {"team": "billing"}

    def test_agent_marks_and_tenant_cannot_remove_or_change_the_mark(self, setup: Setup) -> None:
        ns = setup.tenant_ns
        setup.tenant.create(_pod("marked", ns))
        mark = {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: AGENT_DETAIL}
        _merge(setup.agent, "marked", ns, {"annotations": mark})
        assert _annotations(setup.admin, "marked", ns) == mark

        removal = {"annotations": {names.STATUS: None, names.DETAIL: None}}
        setup.refused_by_policy(refusal(_merge, setup.tenant, "marked", ns, removal), names.STATUS)
        only_detail = {"annotations": {names.DETAIL: None}}
        setup.refused_by_policy(refusal(_merge, setup.tenant, "marked", ns, only_detail), names.DETAIL)
        swap = {"annotations": {names.DETAIL: FORGED_DETAIL}}
        setup.refused_by_policy(refusal(_merge, setup.tenant, "marked", ns, swap), names.DETAIL)
        error = {"annotations": {names.STATUS: names.STATUS_ERROR}}
        setup.refused_by_policy(refusal(_merge, setup.tenant, "marked", ns, error), names.STATUS)
        assert _annotations(setup.admin, "marked", ns) == mark

        # An update that leaves the mark as it is passes, whoever sends it: a merge patch of
        # other fields, and a whole-object replace that carries the mark unchanged.
        _merge(setup.tenant, "marked", ns, {"annotations": {"note": "x"}, "labels": {"v": "2"}})
        pod = setup.tenant.get(Pod, "marked", namespace=ns)
        assert pod.metadata is not None and pod.metadata.annotations is not None
        pod.metadata.annotations["note"] = "y"
        setup.tenant.replace(pod)
        assert _annotations(setup.admin, "marked", ns) == {**mark, "note": "y"}

        # The agent may take its mark back.
        _merge(setup.agent, "marked", ns, removal)
        assert _annotations(setup.admin, "marked", ns) == {"note": "y"}

    def test_an_agent_token_bound_to_a_node_marks_only_that_nodes_pods(
        self, setup: Setup, control_plane: ControlPlane, tmp_path: Path
    ) -> None:
        """The DaemonSet's tokens are bound to the agent's pod, and so name its node: the agent of
        node-1 (or whoever took its token) marks pods of node-1, and no others."""
        ns = setup.tenant_ns
        config = chart.node_bound_agent_kubeconfig(control_plane, setup.release_ns, "node-1", tmp_path / "a1")
        mark = {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: AGENT_DETAIL}
        elsewhere = _pod("on-node-2", ns)
        assert elsewhere.spec is not None
        elsewhere.spec.nodeName = "node-2"
        setup.tenant.create(elsewhere)
        setup.tenant.create(_pod("on-node-1", ns))
        with control_plane.client(KubeConfig.from_file(config)) as agent_of_node_1:
            message = refusal(_merge, agent_of_node_1, "on-node-2", ns, {"annotations": mark})
            setup.refused_by_policy(message, names.STATUS, names.DETAIL)
            assert "bound to node node-1, the pod is on node node-2" in message
            _merge(agent_of_node_1, "on-node-1", ns, {"annotations": mark})
        assert _annotations(setup.admin, "on-node-1", ns) == mark
        assert _annotations(setup.admin, "on-node-2", ns) == {}
        # A token bound to no pod names no node: the agent's ServiceAccount is all that counts.
        _merge(setup.agent, "on-node-2", ns, {"annotations": mark})

    def test_nobody_changes_iptables_args_after_creation(self, setup: Setup) -> None:
        ns = setup.tenant_ns
        # At creation the annotation is the webhook's to write (here: the pod's author's).
        setup.tenant.create(_pod("args", ns, {names.IPTABLES_ARGS: ARGS}))
        changed = json.dumps(["-p", "15001", "-u", "1337", "-i", "10.0.0.0/8"])
        for who in (setup.tenant, setup.agent, setup.admin):
            for value in (changed, None):
                patch = {"annotations": {names.IPTABLES_ARGS: value}}
                message = refusal(_merge, who, "args", ns, patch)
                setup.refused_by_policy(message, names.IPTABLES_ARGS)
                assert "after the pod is created" in message
        assert _annotations(setup.admin, "args", ns) == {names.IPTABLES_ARGS: ARGS}
        # Added to a pod created without it: refused too.
        setup.tenant.create(_pod("no-args", ns))
        patch = {"annotations": {names.IPTABLES_ARGS: ARGS}}
        setup.refused_by_policy(refusal(_merge, setup.tenant, "no-args", ns, patch), names.IPTABLES_ARGS)
        # Unchanged, it rides along with other changes.
        _merge(setup.tenant, "args", ns, {"labels": {"ok": "yes"}})

    def test_status_subresource_and_bindings_are_closed_even_to_the_admin(
        self, setup: Setup, control_plane: ControlPlane
    ) -> None:
        """The tenant's ``edit`` role has neither pods/status patch nor bindings create; whoever
        has them (a node, a scheduler, an admin) cannot write the mark through them either."""
        ns = setup.tenant_ns
        setup.tenant.create(_pod("sub", ns))
        forgery = {"annotations": {names.STATUS: names.STATUS_INITIALIZED}}
        message = refusal(_merge_status, setup.admin, "sub", ns, forgery)
        setup.refused_by_policy(message, names.STATUS)
        # The status subresource does carry metadata: a label goes through it.
        _merge_status(setup.admin, "sub", ns, {"labels": {"via": "status"}})
        pod = setup.admin.get(Pod, "sub", namespace=ns)
        assert pod.metadata is not None and pod.metadata.labels == {"via": "status"}

        # A Binding's annotations are copied onto the pod it binds: pods/binding and bindings.
        for name, use_subresource in (("bind-sub", True), ("bind-ns", False)):
            unscheduled = _pod(name, ns)
            assert unscheduled.spec is not None
            unscheduled.spec.nodeName = None
            setup.tenant.create(unscheduled)
            for annotation, value in ((names.STATUS, names.STATUS_INITIALIZED), (names.IPTABLES_ARGS, ARGS)):
                refused = _bind(control_plane, name, ns, {annotation: value}, subresource=use_subresource)
                assert refused is not None, f"a Binding carrying {annotation} was admitted"
                setup.refused_by_policy(refused, annotation)
            assert _annotations(setup.admin, name, ns) == {}
            assert _bind(control_plane, name, ns, {"scheduler": "test"}, subresource=use_subresource) is None
            assert _annotations(setup.admin, name, ns) == {"scheduler": "test"}

    def test_excluded_namespaces_are_left_alone(self, setup: Setup) -> None:
        """The release namespace (and kube-system) are out of the policy's scope."""
        pod = _pod("free", setup.release_ns, {names.STATUS: names.STATUS_INITIALIZED})
        setup.admin.create(pod)
        _merge(setup.admin, "free", setup.release_ns, {"annotations": {names.STATUS: None}})
        assert _annotations(setup.admin, "free", setup.release_ns) == {}

    def test_the_policy_as_the_api_server_holds_it(self, setup: Setup, control_plane: ControlPlane) -> None:
        out = control_plane.kubectl("get", "validatingadmissionpolicy", setup.policy, "-o", "json").stdout
        policy = json.loads(out)
        assert policy["spec"]["failurePolicy"] == "Fail"
        # The API server type-checked every expression and found nothing to warn about.
        assert not (policy.get("status") or {}).get("typeChecking", {}).get("expressionWarnings")
        out = control_plane.kubectl(
            "get", "validatingadmissionpolicybinding", setup.policy, "-o", "json"
        ).stdout
        binding = json.loads(out)
        assert binding["spec"]["validationActions"] == ["Deny"]
        (excluded,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
        assert excluded["operator"] == "NotIn"
        assert excluded["values"] == ["kube-system", setup.release_ns]


def _bind(
    control_plane: ControlPlane, name: str, namespace: str, annotations: dict[str, str], *, subresource: bool
) -> str | None:
    """As the admin, bind pod ``name`` to node-1 with a Binding carrying ``annotations``, POSTed to
    the pod's binding subresource or to the namespace's bindings (the API server copies them onto
    the pod either way). The refusal's message, or None when the pod was bound."""
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"},
    }
    if subresource:
        args = ["create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/binding", "-f", "-"]
    else:
        args = ["create", "-f", "-"]
    result = control_plane.kubectl(*args, input=json.dumps(binding), check=False)
    if result.returncode == 0:
        return None
    assert "(Forbidden)" in result.stderr, result.stderr
    return result.stderr


# --------------------------------------------------------------------------------------------
# the switch


def test_turned_off_the_tenants_forgery_is_admitted(
    control_plane: ControlPlane, kube: Client, namespace: str, tmp_path: Path
) -> None:
    """helm install (policy on): the forgery is refused; helm upgrade with
    markProtection.enabled=false: the same forgery is admitted."""
    release_ns = f"{namespace}-rel"
    kube.create(Namespace(metadata=ObjectMeta(name=release_ns)))
    fullname = chart.fullname_for(release_ns)
    policy = chart.mark_policy_name(fullname)
    common = [
        "-n",
        release_ns,
        "--set",
        f"fullnameOverride={fullname}",
        "--set",
        "webhook.enabled=false",
        str(chart.chart_dir()),
    ]
    kubeconfig = control_plane.kubeconfig_path
    tenant = control_plane.client(
        KubeConfig.from_file(chart.tenant_kubeconfig(control_plane, namespace, path=tmp_path / "tenant"))
    )
    forgery = {"annotations": {names.STATUS: names.STATUS_INITIALIZED, names.DETAIL: FORGED_DETAIL}}
    try:
        chart.helm("install", "ipnc", *common, kubeconfig=kubeconfig)
        chart.wait_mark_policy(control_plane, policy, enforced=True)
        tenant.create(_pod("mine", namespace))
        message = refusal(_merge, tenant, "mine", namespace, forgery)
        assert f"ValidatingAdmissionPolicy '{policy}'" in message

        chart.helm("upgrade", "ipnc", *common, "--set", "markProtection.enabled=false", kubeconfig=kubeconfig)
        manifest = chart.helm("get", "manifest", "ipnc", "-n", release_ns, kubeconfig=kubeconfig).stdout
        assert not [o for o in chart.parse(manifest) if o["kind"] in chart.MARK_POLICY_KINDS]
        chart.wait_mark_policy(control_plane, policy, enforced=False)
        _merge(tenant, "mine", namespace, forgery)
        assert _annotations(kube, "mine", namespace) == forgery["annotations"]
    finally:
        tenant.close()
        chart.helm("uninstall", "ipnc", "-n", release_ns, kubeconfig=kubeconfig, check=False)
        chart.remove_mark_policy(control_plane, policy)
        kube.delete(Namespace, release_ns)
