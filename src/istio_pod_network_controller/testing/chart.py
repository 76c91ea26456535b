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
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
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


class ChartError(RuntimeError):
    """helm or kubectl failed; the message carries their output."""


def repo_root() -> Path:
    """The checkout this package runs from (an editable install: src/<package>/testing/)."""
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
) -> subprocess.CompletedProcess[str]:
    """Run the test helm with its caches in a throw-away folder, and no kubeconfig unless one is
    given (``helm template`` then needs no cluster at all)."""
    argv = [str(binaries.find("helm")), *args]
    with tempfile.TemporaryDirectory(prefix="ipnc-helm-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_") and k != "KUBECONFIG"}
        env |= {
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        if kubeconfig is not None:
            env["KUBECONFIG"] = str(kubeconfig)
        result = subprocess.run(  # noqa: S603 - argument list
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
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
