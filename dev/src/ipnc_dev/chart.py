"""The Helm chart, rendered by the real helm, for tests that need what the chart installs.

The agent's cluster tests must run the agent the way the chart does: under the chart's
ServiceAccount, with a token of it, and only the permissions the chart's RBAC grants (issue 5,
acceptance 7; issue 7, acceptance 3). ``agent_kubeconfig`` gives them exactly that:

    kubeconfig = chart.agent_kubeconfig(control_plane, "ipnc-system")
    # run the agent with --kubeconfig=kubeconfig

It renders the chart with ``helm template`` (the test helm, see ``binaries``), applies the
ServiceAccounts and RBAC objects of the rendering -- nothing else: no webhook configuration that
would intercept other tests' pods -- waits until the API server's authorizer has caught up, and
writes a kubeconfig holding a TokenRequest token of the agent's ServiceAccount.

Cluster-scoped names (ClusterRole, ClusterRoleBinding) carry the chart's fullname; the helpers give
each namespace its own (``ipnc-<namespace>``) so that tests in different namespaces of one session
control plane do not rebind each other's ServiceAccounts.

The chart's mark policy (a ValidatingAdmissionPolicy) is not applied by ``apply_rbac``: it refuses
every change of the agent's annotations by anyone but one ServiceAccount, which other tests of the
same control plane do not expect. ``mark_policy`` applies it for the length of a ``with`` block and
waits, by probing, until the API server enforces it (and, on leaving, until it no longer does).
``tenant_kubeconfig`` gives a tenant's token: a ServiceAccount bound to the built-in ``edit``
ClusterRole in one namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import binaries

if TYPE_CHECKING:
    from lightkube import Client

    from .controlplane import ControlPlane

CHART_NAME = "istio-pod-network-controller"
RBAC_KINDS = frozenset({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
RBAC_WAIT_SECONDS = 15.0
MARK_POLICY_KINDS = frozenset({"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"})
# The API server loads admission policies from an informer, refreshed about once a second: a policy
# just created (or deleted) takes a moment to be enforced (or to stop being).
MARK_POLICY_WAIT_SECONDS = 30.0
# A namespace every control plane has and no rendering of the chart excludes by default.
PROBE_NAMESPACE = "default"


class ChartError(RuntimeError):
    """helm or kubectl failed; the message carries their output."""


def repo_root() -> Path:
    """The checkout this package runs from: it is installed editable from ``dev/src/ipnc_dev/``,
    three folders below the repository's root (a copy installed elsewhere sets IPNC_CHART_DIR)."""
    return Path(__file__).resolve().parents[3]


def chart_dir() -> Path:
    """The chart's folder: ``$IPNC_CHART_DIR``, else ``chart/istio-pod-network-controller``."""
    override = os.environ.get("IPNC_CHART_DIR")
    path = Path(override) if override else repo_root() / "chart" / CHART_NAME
    if not (path / "Chart.yaml").is_file():
        raise ChartError(f"chart not found at {path} (set IPNC_CHART_DIR)")
    return path


def helm(
    *args: str,
    kubeconfig: Path | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the test helm with its caches in a throw-away folder, and no kubeconfig unless one is
    given (``helm template`` then needs no cluster at all). ``env`` adds variables (e.g.
    ``KUBECACHEDIR``, so that its discovery cache stays out of ``~/.kube``)."""
    argv = [str(binaries.find("helm")), *args]
    with tempfile.TemporaryDirectory(prefix="ipnc-helm-") as home:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_") and k != "KUBECONFIG"}
        child_env |= {
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "KUBECACHEDIR": f"{home}/kube-cache",  # its discovery cache too: never ~/.kube
        }
        if kubeconfig is not None:
            child_env["KUBECONFIG"] = str(kubeconfig)
        child_env |= dict(env or {})
        result = subprocess.run(  # noqa: S603 - argument list
            argv, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=timeout, check=False
        )
    if check and result.returncode != 0:
        raise ChartError(f"helm {' '.join(args)} exited with {result.returncode}:\n{result.stderr}")
    return result


def set_args(values: Mapping[str, str | int | bool] | None) -> list[str]:
    """``--set key=value`` arguments, in the mapping's order."""
    out: list[str] = []
    for key, value in (values or {}).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["--set", f"{key}={text}"]
    return out


def template(
    namespace: str,
    values: Mapping[str, str | int | bool] | None = None,
    *,
    distribution: str = "Kubernetes",
    release: str | None = None,
) -> str:
    """``helm template [RELEASE] -n NAMESPACE --set kubernetesDistribution=... CHART``: the manifest."""
    args = ["template", *([release] if release else []), "-n", namespace]
    args += set_args({"kubernetesDistribution": distribution, **(values or {})})
    args.append(str(chart_dir()))
    return helm(*args).stdout


def parse(manifest: str) -> list[dict[str, Any]]:
    """The objects of a multi-document manifest (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(manifest) if isinstance(doc, dict)]


def dump(objects: Iterable[Mapping[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(dict(o), sort_keys=False) for o in objects)


def fullname_for(namespace: str) -> str:
    """The fullnameOverride the helpers use for ``namespace`` (at most 40 characters, as the
    chart's schema requires)."""
    return f"ipnc-{namespace}"[:40].rstrip("-")


@dataclass(frozen=True)
class ChartAccounts:
    """The ServiceAccounts a rendering of the chart created, and what it was called."""

    namespace: str
    fullname: str

    @property
    def agent(self) -> str:
        return f"{self.fullname}-agent"

    @property
    def webhook(self) -> str:
        return f"{self.fullname}-webhook"

    def user(self, service_account: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{service_account}"


def service_account_groups(namespace: str) -> list[str]:
    """The groups the API server puts a ServiceAccount token's user in."""
    return ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]


def can(
    client: Client,
    namespace: str,
    service_account: str,
    verb: str,
    resource: str,
    *,
    group: str = "",
    in_namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> bool:
    """Whether ServiceAccount ``namespace/service_account`` may ``verb`` the ``resource``, as the
    API server's authorizer answers a SubjectAccessReview (``in_namespace`` None: cluster-wide)."""
    from lightkube.models.authorization_v1 import ResourceAttributes, SubjectAccessReviewSpec
    from lightkube.resources.authorization_v1 import SubjectAccessReview

    review = SubjectAccessReview(
        spec=SubjectAccessReviewSpec(
            user=f"system:serviceaccount:{namespace}:{service_account}",
            groups=service_account_groups(namespace),
            resourceAttributes=ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource,
                namespace=in_namespace,
                name=name,
            ),
        )
    )
    result = client.create(review)
    return bool(result.status is not None and result.status.allowed)


def apply(control_plane: ControlPlane, objects: Sequence[Mapping[str, Any]]) -> str:
    """``kubectl apply -f -`` of ``objects`` as the admin; returns kubectl's output."""
    result = control_plane.kubectl("apply", "-f", "-", input=dump(objects), check=False)
    if result.returncode != 0:
        raise ChartError(f"kubectl apply exited with {result.returncode}:\n{result.stderr}{result.stdout}")
    return result.stdout


def _ensure_namespace(control_plane: ControlPlane, namespace: str) -> None:
    from lightkube import ApiError
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    with control_plane.client() as client:
        try:
            client.create(Namespace(metadata=ObjectMeta(name=namespace)))
        except ApiError as e:
            if e.status.code != 409:
                raise


def apply_rbac(
    control_plane: ControlPlane,
    namespace: str,
    *,
    fullname: str | None = None,
    distribution: str = "Kubernetes",
    values: Mapping[str, str | int | bool] | None = None,
) -> ChartAccounts:
    """Render the chart for ``namespace`` and apply its ServiceAccounts and RBAC objects only
    (the namespace is created when missing). Returns once the authorizer lets the agent list pods,
    so a token requested afterwards works at once."""
    fullname = fullname or fullname_for(namespace)
    objects = parse(
        template(namespace, {"fullnameOverride": fullname, **(values or {})}, distribution=distribution)
    )
    rbac = [o for o in objects if o.get("kind") in RBAC_KINDS]
    if not rbac:
        raise ChartError("the chart rendered no ServiceAccount or RBAC object")
    _ensure_namespace(control_plane, namespace)
    apply(control_plane, rbac)
    accounts = ChartAccounts(namespace=namespace, fullname=fullname)
    deadline = time.monotonic() + RBAC_WAIT_SECONDS
    with control_plane.client() as client:
        while not can(client, namespace, accounts.agent, "list", "pods"):
            if time.monotonic() > deadline:
                raise ChartError(
                    f"RBAC for {accounts.user(accounts.agent)} not in effect after {RBAC_WAIT_SECONDS} s"
                )
            time.sleep(0.1)
    return accounts


def agent_kubeconfig(
    control_plane: ControlPlane,
    namespace: str,
    path: Path | None = None,
    *,
    fullname: str | None = None,
    distribution: str = "Kubernetes",
) -> Path:
    """A kubeconfig for the chart's agent ServiceAccount in ``namespace`` (a TokenRequest token,
    valid one hour), under exactly the chart's RBAC; written to ``path`` or the control plane's
    folder. Applies the chart's ServiceAccounts and RBAC first (idempotent)."""
    accounts = apply_rbac(control_plane, namespace, fullname=fullname, distribution=distribution)
    return control_plane.write_service_account_kubeconfig(namespace, accounts.agent, path, create=False)


# --------------------------------------------------------------------------------------------
# the mark policy


def mark_policy_name(fullname: str = CHART_NAME) -> str:
    """The name of the chart's ValidatingAdmissionPolicy (and of its binding)."""
    return f"{fullname}-mark"


def probe_mark_policy(
    control_plane: ControlPlane, policy: str, *, namespace: str = PROBE_NAMESPACE
) -> str | None:
    """The message with which policy ``policy`` refuses the admin a pod carrying the agent's status
    annotation (a server-side dry run: nothing is created), or None when that policy did not
    refuse it."""
    from lightkube import ApiError
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod

    from istio_pod_network_controller import names

    probe = Pod(
        metadata=ObjectMeta(
            generateName="mark-policy-probe-",
            namespace=namespace,
            annotations={names.STATUS: names.STATUS_INITIALIZED},
        ),
        spec=PodSpec(containers=[Container(name="probe", image="example.invalid/probe:1")]),
    )
    with control_plane.client() as client:
        try:
            client.create(probe, dry_run=True)
        except ApiError as e:
            message = e.status.message or ""
            if f"ValidatingAdmissionPolicy '{policy}'" in message:
                return message
    return None


def wait_mark_policy(
    control_plane: ControlPlane,
    policy: str,
    *,
    enforced: bool,
    namespace: str = PROBE_NAMESPACE,
    timeout: float = MARK_POLICY_WAIT_SECONDS,
) -> None:
    """Probe until the API server enforces policy ``policy`` (``enforced``) or no longer does."""
    deadline = time.monotonic() + timeout
    while (probe_mark_policy(control_plane, policy, namespace=namespace) is not None) != enforced:
        if time.monotonic() > deadline:
            state = "enforced" if enforced else "still enforced"
            raise ChartError(f"ValidatingAdmissionPolicy {policy} not {state} after {timeout} s")
        time.sleep(0.2)


def remove_mark_policy(control_plane: ControlPlane, policy: str) -> None:
    """Delete the policy and its binding (if there) and wait until the API server stops enforcing
    it, so that the next test of the same control plane is not refused by a stale copy."""
    for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
        control_plane.kubectl("delete", kind, policy, "--ignore-not-found", check=False)
    wait_mark_policy(control_plane, policy, enforced=False)


@contextlib.contextmanager
def mark_policy(
    control_plane: ControlPlane,
    namespace: str,
    *,
    fullname: str | None = None,
    values: Mapping[str, str | int | bool] | None = None,
) -> Iterator[str]:
    """The chart's mark policy as rendered for release namespace ``namespace``, applied and
    enforced inside the ``with`` block (yields its name), removed again afterwards."""
    fullname = fullname or fullname_for(namespace)
    objects = parse(template(namespace, {"fullnameOverride": fullname, **(values or {})}))
    policy = [o for o in objects if o.get("kind") in MARK_POLICY_KINDS]
    if len(policy) != 2:
        raise ChartError(f"the chart rendered {len(policy)} mark policy objects, expected 2")
    name = mark_policy_name(fullname)
    try:
        apply(control_plane, policy)
        wait_mark_policy(control_plane, name, enforced=True)
        yield name
    finally:
        remove_mark_policy(control_plane, name)


# --------------------------------------------------------------------------------------------
# a tenant


AGGREGATED_ROLES = ("view", "edit", "admin")


def aggregate_cluster_roles(control_plane: ControlPlane) -> None:
    """Fill the rules of the built-in aggregated ClusterRoles (view, edit, admin) from the roles
    their selectors pick, as the controller-manager's aggregation controller does (the test
    control plane runs none, so the API server leaves them empty). Repeated until nothing changes,
    because edit aggregates view and admin aggregates edit."""

    def rules_key(rule: Mapping[str, Any]) -> str:
        return json.dumps(rule, sort_keys=True)

    for _ in range(len(AGGREGATED_ROLES) + 1):
        listed = json.loads(control_plane.kubectl("get", "clusterroles", "-o", "json").stdout)["items"]
        changed = False
        for role in listed:
            if role["metadata"]["name"] not in AGGREGATED_ROLES or not role.get("aggregationRule"):
                continue
            wanted: dict[str, Any] = {}
            for selector in role["aggregationRule"]["clusterRoleSelectors"]:
                labels = selector.get("matchLabels", {})
                for other in listed:
                    if other is role:
                        continue
                    have = other["metadata"].get("labels") or {}
                    if all(have.get(k) == v for k, v in labels.items()):
                        for rule in other.get("rules") or []:
                            wanted.setdefault(rules_key(rule), rule)
            current = {rules_key(r) for r in role.get("rules") or []}
            if set(wanted) - current:
                patch = {
                    "rules": [*(role.get("rules") or []), *(r for k, r in wanted.items() if k not in current)]
                }
                control_plane.kubectl(
                    "patch", "clusterrole", role["metadata"]["name"], "--type=merge", "-p", json.dumps(patch)
                )
                changed = True
        if not changed:
            return
    raise ChartError("the aggregated ClusterRoles did not settle")


def tenant_kubeconfig(
    control_plane: ControlPlane,
    namespace: str,
    *,
    name: str = "tenant",
    cluster_role: str = "edit",
    path: Path | None = None,
) -> Path:
    """A kubeconfig for ServiceAccount ``namespace/name``, bound to the built-in ClusterRole
    ``cluster_role`` in ``namespace`` only (a RoleBinding): what a namespace's developers usually
    get. Returns once the authorizer lets it patch pods there."""
    from lightkube import ApiError
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.models.rbac_v1 import RoleRef, Subject
    from lightkube.resources.rbac_authorization_v1 import RoleBinding

    aggregate_cluster_roles(control_plane)
    with control_plane.client() as client:
        binding = RoleBinding(
            metadata=ObjectMeta(name=f"{name}-{cluster_role}", namespace=namespace),
            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="ClusterRole", name=cluster_role),
            subjects=[Subject(kind="ServiceAccount", name=name, namespace=namespace)],
        )
        try:
            client.create(binding)
        except ApiError as e:
            if e.status.code != 409:
                raise
    kubeconfig = control_plane.write_service_account_kubeconfig(namespace, name, path)
    deadline = time.monotonic() + RBAC_WAIT_SECONDS
    with control_plane.client() as client:
        while not can(client, namespace, name, "patch", "pods", in_namespace=namespace):
            if time.monotonic() > deadline:
                user = f"system:serviceaccount:{namespace}:{name}"
                raise ChartError(f"RBAC for {user} not in effect after {RBAC_WAIT_SECONDS} s")
            time.sleep(0.1)
    return kubeconfig


def node_bound_agent_kubeconfig(
    control_plane: ControlPlane,
    namespace: str,
    node: str,
    path: Path,
    *,
    fullname: str | None = None,
) -> Path:
    """A kubeconfig for the chart's agent ServiceAccount in ``namespace`` whose token is bound to
    an agent pod on ``node``, as the DaemonSet's projected tokens are: the API server then names
    ``node`` in the token's user (``authentication.kubernetes.io/node-name``), which the mark
    policy checks. The stand-in pod (``agent-<node>``, never run) is created here; the token stops
    working when it is deleted. Applies the chart's RBAC first (idempotent)."""
    from lightkube import ApiError
    from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod, ServiceAccountToken

    accounts = apply_rbac(control_plane, namespace, fullname=fullname)
    name = f"agent-{node}"
    with control_plane.client() as client:
        try:
            client.create(
                Pod(
                    metadata=ObjectMeta(name=name, namespace=namespace),
                    spec=PodSpec(
                        nodeName=node,
                        serviceAccountName=accounts.agent,
                        containers=[Container(name="agent", image="example.invalid/agent:1")],
                    ),
                )
            )
        except ApiError as e:
            if e.status.code != 409:
                raise
        pod = client.get(Pod, name, namespace=namespace)
        assert pod.metadata is not None
        spec = TokenRequestSpec(
            audiences=[],
            expirationSeconds=3600,
            boundObjectRef=BoundObjectReference(kind="Pod", apiVersion="v1", name=name, uid=pod.metadata.uid),
        )
        request = ServiceAccountToken(
            metadata=ObjectMeta(name=accounts.agent, namespace=namespace), spec=spec
        )
        result = client.create(request, accounts.agent, namespace=namespace)
    if result.status is None or not result.status.token:
        raise ChartError(
            f"TokenRequest for {accounts.user(accounts.agent)} bound to {name} returned no token"
        )
    return control_plane.kubeconfig_for_token(result.status.token, path, name=f"{namespace}-{name}")
